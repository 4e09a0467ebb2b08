"""Does privacy survive quantization? ``qdefend compare``: the same attacks on the float and the int8
artifacts of each run, side by side, with a verdict per metric.

For every run and every artifact (default: ``encoder.float.onnx``, the float twin, and
``encoder.int8.tflite``, what a phone runs) each chosen attack runs through
:func:`qdefend.attacks.runner.attack_run` (results land in ``runs/NAME/attacks/`` and are re-used
when a later compare asks for the same attack, config and seed: an interrupted compare resumes).
Then ``report.md``, ``report.json`` and ``figures/*.png`` are written:

* a table per run: each artifact's test accuracy (from the manifest's verification), MSE / PSNR /
  SSIM of each inversion attack with 95% bootstrap intervals over the test images and the
  mean-image floor, and clone accuracy / fidelity of each extraction attack;
* reconstruction grids: private images, then each inversion attack on each artifact;
* a verdict per metric. Inversion metrics are paired (the same test images for every artifact):
  the 95% percentile-bootstrap interval of the per-image difference int8 - float decides between
  "int8 keeps privacy" (no significant change, or harder to invert), and "int8 leaks more".
  Extraction fidelity uses the normal interval of a difference of two proportions. Each verdict
  also says whether the float model was private to begin with (how far the attack beats the
  mean-image floor), so "keeps" is never read as "has";
* with ``baseline`` (one of the runs, the undefended one): what every other run's defense buys
  against it, per artifact and attack: inversion MSE / SSIM paired over the same private images
  (ratio and 95% interval of the difference), KnockoffNets fidelity (two proportions), and the
  accuracy a device gets on each, in points; plus one grid of every run's reconstructions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from qdefend import checks
from qdefend.plainjson import plain

from .base import ATTACKS, AttackError, AttackResult
from .grid import save_grid
from .metrics import bootstrap_ci
from qdefend.config import parse_assignment
from qdefend.edge.manifest import device_accuracy, load_manifest
from qdefend.run import RunPaths, load_run
from .runner import attack_run, saved_result

__all__ = ["CompareConfig", "DEFAULT_ATTACKS", "DEFAULT_ARTIFACTS", "compare", "paired_verdict", "fidelity_verdict",
           "gain_verdict", "fidelity_gain"]

DEFAULT_ATTACKS = ("decoder", "clone_rmle", "knockoff")
DEFAULT_ARTIFACTS = ("encoder.float.onnx", "encoder.int8.tflite")
REPORT_VERSION = 1
# metric -> +1 when a larger value means more privacy (the attack did worse), -1 otherwise
PRIVACY_SIGN = {"mse": 1, "psnr": -1, "ssim": -1, "fidelity": -1, "clone_acc": -1}


# The demo's attack budgets on 2 CPU cores: the decoder's "fast" preset (CEM's residual decoder,
# fewer blocks and epochs); benchmarks/attack_strength.py measures how far it is from the default.
DEMO_PRESETS = {"decoder": "fast"}
STRENGTH_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "attack_strength" / \
    "attack_strength.json"


def preset_gap(attack: str, preset: str, results: Path = STRENGTH_RESULTS) -> str:
    """One sentence: ``attack`` runs ``preset``, not its full-strength default, and how far apart the
    two were in benchmarks/attack_strength.py on the undefended artifact (when its results are here)."""
    head = (f"{attack} runs its lighter '{preset}' preset here, not the full-strength default "
            f"(`qdefend attack RUN --attack {attack}`), to fit 2 CPU cores")
    # full strength: a "default" cell on an undefended artifact run with today's default settings
    # (an older default's row does not count), and the preset's cell on the same artifact
    today = {k: v for k, v in asdict(ATTACKS.get(attack).config_cls()).items() if k != "device"}
    try:
        rows = [r for r in json.loads(results.read_text())["rows"] if str(r.get("target", "")).startswith("undefended")]
        full_row = next(r for r in rows if r["cell"] == "default"
                        and all(r.get("config", {}).get(k) == v for k, v in today.items()))
        full = full_row["metrics"]
        lite = next(r for r in rows if r["target"] == full_row["target"] and r["cell"] == f"{preset}-preset")["metrics"]
    except (OSError, ValueError, KeyError, StopIteration):
        return head + "; its distance from full strength is measured by benchmarks/attack_strength.py"
    return (head + f"; measured on the undefended int8 TFLite artifact (benchmarks/attack_strength.py): MSE "
            f"{lite['mse']:.4f} vs {full['mse']:.4f} at full strength ({100 * (lite['mse'] / full['mse'] - 1):+.0f}%), "
            f"SSIM {lite['ssim']:.3f} vs {full['ssim']:.3f}: its figures understate the leak by that much")


@dataclass
class CompareConfig:
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    artifacts: list[str] = field(default_factory=lambda: list(DEFAULT_ARTIFACTS))
    quick: bool = False  # the attacks' quick presets (tests, smoke runs)
    presets: dict[str, str] = field(default_factory=dict)  # attack -> preset (e.g. {"decoder": "fast"}); quick wins
    seed: int = 0
    force: bool = False  # re-run attacks whose results are already in runs/NAME/attacks
    jobs: int = 0  # worker processes (one target each); 0 = one per CPU
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # per attack --set overrides
    baseline: str | None = None  # one of the runs (the undefended one): what every other run's defense buys

    def __post_init__(self):
        for a in self.attacks:
            ATTACKS.get(a)  # unknown names list the valid ones
        for a, p in self.presets.items():
            cls = ATTACKS.get(a)
            if p not in ("default", *cls.presets):
                raise AttackError(f"attack '{a}' has no preset '{p}'. Valid presets: "
                                  f"{', '.join(['default', *sorted(cls.presets)])}")
        checks.check_number(self.jobs, "--jobs (0: one per CPU)", lo=0, integer=True, fix="--jobs 2", error=AttackError)
        if not self.attacks or not self.artifacts:
            raise AttackError("compare needs at least one attack and one artifact: e.g. --attacks decoder "
                              "--artifacts encoder.float.onnx,encoder.int8.tflite")


def parse_presets(items: list[str], attacks: Iterable[str] | None = None) -> dict[str, str]:
    """``["decoder=fast", "gan=fast"]`` -> {"decoder": "fast", "gan": "fast"}; an attack outside
    ``attacks`` (when given) is refused."""

    out = {a: str(p) for a, p in (parse_assignment(item, "--preset", "decoder=fast", "ATTACK=PRESET", AttackError)
                                  for item in items)}
    bad = [a for a in out if attacks is not None and a not in attacks]
    if bad:
        raise AttackError(f"--preset {bad[0]}=...: ATTACK is one of {', '.join(attacks)}, e.g. decoder=fast")
    return out


# ---------------------------------------------------------------------------------------- verdicts


def _fmt(v: float | None, metric: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if metric == "psnr":
        return f"{v:.2f}"
    if metric in ("fidelity", "clone_acc", "acc"):
        return f"{100 * v:.2f}%"
    return f"{v:.4f}"


NEGLIGIBLE = 0.01  # a significant difference under 1% of the float value is reported as negligible


def _judge(metric: str, lo: float, hi: float, diff: float, ref: float, verb: str) -> tuple[str, bool]:
    """The verdict words for a 95% interval [lo, hi] of int8 - float on ``metric`` (mean ``diff``,
    float value ``ref``), and whether int8 keeps the float model's privacy."""
    sign = PRIVACY_SIGN[metric]
    gain_lo, gain_hi = sorted((sign * lo, sign * hi))  # change in privacy, int8 - float
    if gain_lo <= 0 <= gain_hi:
        return "int8 keeps float's privacy level (no significant difference)", True
    if abs(diff) < NEGLIGIBLE * abs(ref):
        return "int8 keeps float's privacy level (a significant but negligible difference, under 1%)", True
    if gain_hi < 0:
        return "int8 leaks more than float", False
    return f"int8 keeps privacy and more (harder to {verb} than float)", True


def _paired_diff(ref_vals, vals, seed: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(ref, vals, vals - ref, and the 95% percentile-bootstrap interval of the mean difference) for
    per-image values of the same images."""
    f, q = np.asarray(ref_vals, np.float64), np.asarray(vals, np.float64)
    if f.shape != q.shape or f.size == 0:
        raise ValueError(f"{what}: per-image values differ in shape {f.shape} vs {q.shape}")
    d = q - f
    lo, hi = bootstrap_ci(d, n=2000, seed=seed)
    return f, q, d, lo, hi


def _proportion_diff(p_ref: float, p: float, n: int) -> tuple[float, float, float]:
    """(p - p_ref, and the normal 95% interval of that difference) for two independent proportions
    over ``n`` test images each."""
    d = p - p_ref
    se = math.sqrt(max(p_ref * (1 - p_ref), 0) / n + max(p * (1 - p), 0) / n)
    return d, d - 1.96 * se, d + 1.96 * se


def paired_verdict(metric: str, float_vals, int8_vals, *, floor: float | None = None, seed: int = 0) -> dict:
    """Verdict on an inversion metric from per-image values of the same images on both artifacts."""
    f, q, d, lo, hi = _paired_diff(float_vals, int8_vals, seed, "paired_verdict")
    word, keeps = _judge(metric, lo, hi, float(d.mean()), float(f.mean()), "invert")
    text = (f"{word}: {metric.upper()} {_fmt(q.mean(), metric)} int8 vs {_fmt(f.mean(), metric)} float, "
            f"difference {d.mean():+.3g}, 95% interval [{lo:+.3g}, {hi:+.3g}] over {f.size} test images")
    out = {"metric": metric, "int8": float(q.mean()), "float": float(f.mean()), "diff": float(d.mean()),
           "ci": [lo, hi], "keeps_privacy": keeps, "n": int(f.size)}
    if metric == "mse" and floor:
        ratio = floor / max(f.mean(), 1e-12)
        out["float_leak_ratio"] = float(ratio)
        text += (f"; the float model {'leaks' if ratio > 1.5 else 'is near the floor'}: the attack's MSE is "
                 f"{1 / ratio:.2f}x the mean-image floor {floor:.4f}")
    out["text"] = text
    return out


def fidelity_verdict(metric: str, p_float: float, p_int8: float, n: int) -> dict:
    """Verdict on an extraction proportion (fidelity, clone accuracy) of two independent clones."""
    d, lo, hi = _proportion_diff(p_float, p_int8, n)
    word, keeps = _judge(metric, lo, hi, d, p_float, "extract")
    text = (f"{word}: {metric} {_fmt(p_int8, metric)} int8 vs {_fmt(p_float, metric)} float, difference "
            f"{100 * d:+.2f} points, 95% interval [{100 * lo:+.2f}, {100 * hi:+.2f}] over {n} test images")
    return {"metric": metric, "int8": p_int8, "float": p_float, "diff": d, "ci": [lo, hi], "keeps_privacy": keeps,
            "n": n, "text": text}


# ---------------------------------------------------------------------------------------- what a defense buys


def _gain_words(metric: str, lo: float, hi: float) -> tuple[str, bool]:
    """The words for a 95% interval [lo, hi] of defended - baseline on ``metric``, and whether the
    defended model is significantly more private."""
    g_lo, g_hi = sorted((PRIVACY_SIGN[metric] * lo, PRIVACY_SIGN[metric] * hi))
    if g_lo <= 0 <= g_hi:
        return "no significant privacy gain", False
    if g_hi < 0:
        return "less private than the baseline", False
    return "more private than the baseline", True


def gain_verdict(metric: str, base_vals, defended_vals, *, seed: int = 0, floor: float | None = None) -> dict:
    """What a defense buys on an inversion metric: per-image values of the same test images attacked
    through the baseline's and the defended model's artifact (same attack settings). ``floor``: the
    mean-image MSE on the defended side; an attack whose MSE does not beat it failed there, which
    is said, since a failed attack is not proof that the defense holds."""
    b, q, d, lo, hi = _paired_diff(base_vals, defended_vals, seed, "gain_verdict")
    word, gains = _gain_words(metric, lo, hi)
    ratio = float(q.mean() / b.mean()) if b.mean() > 0 else None
    times = f" ({ratio:.2f}x the baseline's)" if metric == "mse" and ratio is not None else ""
    text = (f"{word}: {metric.upper()} {_fmt(q.mean(), metric)} vs {_fmt(b.mean(), metric)} undefended{times}, "
            f"difference {d.mean():+.3g}, 95% interval [{lo:+.3g}, {hi:+.3g}] over {b.size} test images")
    failed = metric == "mse" and floor is not None and q.mean() >= floor
    if failed:
        text += (f"; on the defended model this attack does not beat the mean-image floor {floor:.4f}: it failed "
                 "there, which is not proof that the defense holds against a stronger one")
    return {"metric": metric, "defended": float(q.mean()), "baseline": float(b.mean()), "ratio": ratio,
            "diff": float(d.mean()), "ci": [lo, hi], "gains_privacy": gains, "attack_failed": failed,
            "n": int(b.size), "text": text}


def fidelity_gain(metric: str, p_base: float, p_defended: float, n: int) -> dict:
    """What a defense buys on an extraction proportion (fidelity, clone accuracy): two independent
    clones, each scored on ``n`` test images."""
    d, lo, hi = _proportion_diff(p_base, p_defended, n)
    word, gains = _gain_words(metric, lo, hi)
    text = (f"{word}: {metric} {_fmt(p_defended, metric)} vs {_fmt(p_base, metric)} undefended, difference "
            f"{100 * d:+.2f} points, 95% interval [{100 * lo:+.2f}, {100 * hi:+.2f}] over {n} test images")
    return {"metric": metric, "defended": p_defended, "baseline": p_base,
            "ratio": p_defended / p_base if p_base else None, "diff": d, "ci": [lo, hi], "gains_privacy": gains,
            "n": n, "text": text}


def _gains(cfg: CompareConfig, base: dict, base_results: dict, entry: dict, results: dict, seed: int) -> list[dict]:
    """Per artifact and attack metric: the defended run (``entry``/``results``) against the
    baseline run, with the accuracy each delivers on that artifact."""
    out = []
    for art in cfg.artifacts:
        acc_b, acc_d = base["artifacts"][art]["device_acc"], entry["artifacts"][art]["device_acc"]
        cost = None if acc_b is None or acc_d is None else 100 * (acc_d - acc_b)
        for attack in cfg.attacks:
            b, q = base_results.get((attack, art)), results.get((attack, art))
            if b is None or q is None:
                continue
            row = {"attack": attack, "artifact": art, "acc_baseline": acc_b, "acc_defended": acc_d,
                   "acc_change_points": cost}
            fam, on = _comparable(attack, b, q)
            if fam == "inversion":
                pb, pq = on
                out += [{**row, **gain_verdict(m, pb[m], pq[m], seed=seed, floor=q.metrics.get("baseline_mse"))}
                        for m in ("mse", "ssim") if m in pb and m in pq]
            elif fam == "extraction" and "fidelity" in b.metrics and "fidelity" in q.metrics:
                out.append({**row, **fidelity_gain("fidelity", b.metrics["fidelity"], q.metrics["fidelity"], on)})
    return out


def _comparable(attack: str, a: AttackResult, b: AttackResult) -> tuple[str | None, Any]:
    """What two results of one attack can be tested against each other on: an inversion attack's
    per-image metrics (``(family, (a's, b's))``) when both inverted the same private images, an
    extraction attack's evaluation query count (``(family, n)``) when both were scored on the same
    number of queries; ``(None, None)`` when they cannot be paired."""
    fam = ATTACKS.get(attack).family
    if fam == "inversion" and a.extra.get("test_indices") == b.extra.get("test_indices"):
        return fam, (a.extra.get("per_image", {}), b.extra.get("per_image", {}))
    if fam == "extraction":
        n = int(a.extra.get("evaluation_queries") or 0)
        if n and n == int(b.extra.get("evaluation_queries") or 0):
            return fam, n
    return None, None


# ---------------------------------------------------------------------------------------- compare


def _precision(artifact: str) -> str:
    return "int8" if "int8" in artifact else "float"


def compare(runs: list[str | Path], cfg: CompareConfig | None = None, out: str | Path | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Attack every artifact of every run, write the report; returns report.json's content."""

    cfg = cfg or CompareConfig()
    say = progress or (lambda m: None)
    runs = [Path(r) for r in runs]
    if not runs:
        raise AttackError("compare needs at least one run directory, e.g. qdefend compare runs/demo")
    base_dir = _baseline(cfg, runs)
    for r in runs:
        RunPaths(r).require_trained()
        if not RunPaths(r).manifest.is_file():
            raise AttackError(f"{r} has no exported artifacts: run `qdefend export {r}` first")
        arts = load_manifest(r)["artifacts"]
        missing = [a for a in cfg.artifacts if a not in arts]
        if missing:
            raise AttackError(f"{r} has no artifact {missing[0]}. Exported: {', '.join(sorted(arts))} "
                              f"(re-export with `qdefend export {r}`)")
    out = Path(out) if out is not None else (runs[0] / "report" if len(runs) == 1 else Path("report"))
    (out / "figures").mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"version": REPORT_VERSION, "config": asdict(cfg), "runs": []}
    t_all = time.perf_counter()
    jobs = [(r, art) for r in runs for art in cfg.artifacts]
    todo = [(r, art) for r, art in jobs if cfg.force or any(_reusable(r, art, a, cfg)[1] is None for a in cfg.attacks)]
    workers = max(1, min(cfg.jobs or _cpus(), len(todo)))
    if todo:
        say(f"compare: {len(todo)} target(s) to attack with {', '.join(cfg.attacks)} "
            f"({workers} worker process{'es' if workers > 1 else ''}, {max(1, _cpus() // workers)} thread(s) each)")
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futs = [pool.submit(_attack_target, str(r), art, asdict(cfg), max(1, _cpus() // workers))
                    for r, art in todo]
            for f in futs:
                f.result()  # re-raises a worker's error
    else:
        for r, art in todo:
            _attack_target(str(r), art, asdict(cfg), None, say)
    per_run: dict[str, dict] = {}
    for r in runs:
        manifest = load_manifest(r)
        ver = manifest.get("verification", {}).get("artifacts", {})
        entry: dict[str, Any] = {"run": str(r), "name": r.name, "defense": manifest.get("release", {}),
                                 "trained_with": _trained_with(r),
                                 "artifacts": {}, "verdicts": [], "figures": []}
        results: dict[tuple[str, str], AttackResult] = {}
        for attack in cfg.attacks:
            for art in cfg.artifacts:
                path, res = _reusable(r, art, attack, cfg)
                if res is None:
                    raise AttackError(f"compare: {attack} on {art} of {r} left no result at {path}")
                results[(attack, art)] = res
                a = entry["artifacts"].setdefault(art, {"precision": _precision(art),
                                                        "test_acc": ver.get(art, {}).get("test_acc"),
                                                        "test_acc_release": ver.get(art, {}).get("test_acc_release"),
                                                        "device_acc": device_accuracy(manifest, art),
                                                        "attacks": {}})
                a["attacks"][attack] = {"metrics": res.metrics, "timings": res.timings, "json": str(path),
                                        "notes": res.notes}
        entry["verdicts"] = _verdicts(cfg, results, seed=cfg.seed)
        entry["figures"] = _figures(cfg, results, out / "figures", r.name)
        report["runs"].append(entry)
        per_run[entry["run"]] = results
    if base_dir is not None:
        base = next(e for e in report["runs"] if e["run"] == str(base_dir))
        report["baseline"] = base["run"]
        for e in report["runs"]:
            if e is not base:
                e["gains"] = _gains(cfg, base, per_run[base["run"]], e, per_run[e["run"]], seed=cfg.seed)
        report["gain_figures"] = _gain_figures(cfg, report["runs"], per_run, base["run"], out / "figures")
    report["timings"] = {"total_s": round(time.perf_counter() - t_all, 1)}
    (out / "report.json").write_text(json.dumps(plain(report), indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, out))
    say(f"compare: wrote {out / 'report.md'} ({report['timings']['total_s']:.0f} s)")
    report["out"] = str(out)
    return report


def _trained_with(run_dir: Path) -> str:
    """The run's defense stack with its parameters and its cut, from its config.toml, e.g. 'defense
    nopeek {"nopeek": {"alpha": 1.0, ...}}, cut 4 of vgg11_bn'."""
    from qdefend.config import RunConfig
    from qdefend.models import reference_cut

    cfg = RunConfig.load(RunPaths(run_dir).config)
    stack = cfg.defense.stack
    params = {k: v for k, v in cfg.defense.params.items() if k in stack.split("+")}
    ref = reference_cut(cfg.model.name)
    cut = cfg.model.cut if cfg.model.cut is not None else ref
    return (f"defense {stack}" + (f" {json.dumps(params)}" if params else "")
            + f", cut {cut} of {cfg.model.name}" + (" (its reference cut)" if cut == ref else ""))


def _baseline(cfg: CompareConfig, runs: list[Path]) -> Path | None:
    """The run ``cfg.baseline`` names, checked before anything runs."""
    if cfg.baseline is None:
        return None
    hit = [r for r in runs if r.resolve() == Path(cfg.baseline).resolve()]
    if not hit:
        raise AttackError(f"--baseline {cfg.baseline} is not one of the runs compared ({', '.join(map(str, runs))}): "
                          f"name one of them, e.g. --baseline {runs[0]}")
    if len(runs) < 2:
        raise AttackError(f"--baseline needs a defended run to compare with it: e.g. qdefend compare {runs[0]} "
                          f"runs/defended --baseline {runs[0]}")
    return hit[0]


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _preset(cfg: CompareConfig, attack: str) -> str | None:
    p = "quick" if cfg.quick else cfg.presets.get(attack)
    return None if p == "default" else p


def _reusable(run_dir: Path, art: str, attack: str, cfg: CompareConfig) -> tuple[Path, AttackResult | None]:
    """(result path, the saved result there if compare may reuse it: :func:`.runner.saved_result`)."""

    return saved_result(run_dir, art, attack, preset=_preset(cfg, attack), params=cfg.params.get(attack),
                        seed=cfg.seed)


def _attack_target(run_dir: str, art: str, cfg_dict: dict, threads: int | None,
                   say: Callable[[str], None] | None = None) -> None:
    """Run every attack of the compare on one target; a worker process (no ``say``) prints its
    progress prefixed with the run and target."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch/torchao internals, as in the CLI
    warnings.filterwarnings("ignore", category=DeprecationWarning)



    if threads:
        torch.set_num_threads(threads)
    cfg = CompareConfig(**cfg_dict)
    tag = f"[{Path(run_dir).name} {art}] "
    say = say or (lambda m: print(tag + m, flush=True))
    run = None
    for attack in cfg.attacks:
        path, saved = _reusable(Path(run_dir), art, attack, cfg)
        if not cfg.force and saved is not None:
            say(f"{attack}: re-using {path}")
            continue
        run = run if run is not None else load_run(run_dir)
        t0 = time.perf_counter()
        say(f"{attack} on {art}")
        _, path = attack_run(run_dir, art, attack, preset=_preset(cfg, attack), params=cfg.params.get(attack),
                             seed=cfg.seed, run=run, progress=lambda m: say(f"  {m}"))
        say(f"{attack} on {art}: done in {time.perf_counter() - t0:.0f} s -> {path}")


def _pairs(cfg: CompareConfig) -> list[tuple[str, str]]:
    """(float artifact, int8 artifact) pairs to judge: every int8 artifact against the first float one."""
    floats = [a for a in cfg.artifacts if _precision(a) == "float"]
    return [(floats[0], a) for a in cfg.artifacts if _precision(a) == "int8"] if floats else []


def _verdicts(cfg: CompareConfig, results: dict, seed: int) -> list[dict]:
    out = []
    for fa, qa in _pairs(cfg):
        for attack in cfg.attacks:
            f, q = results.get((attack, fa)), results.get((attack, qa))
            if f is None or q is None:
                continue
            fam, on = _comparable(attack, f, q)
            if fam == "inversion":
                pf, pq = on
                for m in ("mse", "psnr", "ssim"):
                    if m in pf and m in pq:
                        v = paired_verdict(m, pf[m], pq[m], floor=f.metrics.get("baseline_mse") if m == "mse" else None,
                                           seed=seed)
                        out.append({"attack": attack, "float_artifact": fa, "int8_artifact": qa, **v})
            elif fam == "extraction":
                for m in ("fidelity", "clone_acc"):
                    if m in f.metrics and m in q.metrics:
                        v = fidelity_verdict(m, f.metrics[m], q.metrics[m], on)
                        out.append({"attack": attack, "float_artifact": fa, "int8_artifact": qa, **v})
    return out


def _figures(cfg: CompareConfig, results: dict, fig_dir: Path, name: str) -> list[str]:
    rows, origs = [], None
    for attack in cfg.attacks:
        for art in cfg.artifacts:
            r = results.get((attack, art))
            if r is not None and r.reconstructions is not None:
                origs = r.originals if origs is None else origs
                rows.append((f"{attack} / {art}", r.reconstructions))
    if not rows:
        return []
    path = save_grid([("private test images", origs), *rows], fig_dir / f"{name}-reconstructions.png", n=12)
    return [str(path)]


def _gain_figures(cfg: CompareConfig, entries: list[dict], per_run: dict, base: str, fig_dir: Path) -> list[str]:
    """One grid per int8 artifact: the private images, then each inversion attack on every run."""
    paths = []
    for art in [a for a in cfg.artifacts if _precision(a) == "int8"]:
        rows, origs, idx = [], None, None
        for attack in cfg.attacks:
            for e in sorted(entries, key=lambda e: e["run"] != base):
                r = per_run[e["run"]].get((attack, art))
                if r is None or r.reconstructions is None:
                    continue
                if origs is None:
                    origs, idx = r.originals, r.extra.get("test_indices")
                elif idx is not None and r.extra.get("test_indices") != idx:
                    continue
                rows.append((f"{attack} / {e['name']}", r.reconstructions))
        if len(rows) > 1:
            paths.append(str(save_grid([("private test images", origs), *rows],
                                       fig_dir / f"defenses-{art.replace('.', '_')}.png", n=12)))
    return paths


# ---------------------------------------------------------------------------------------- markdown


def _ci(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    return f" [{_fmt(lo, key)}, {_fmt(hi, key)}]" if lo is not None and hi is not None else ""


def render_markdown(report: dict, out: Path) -> str:
    lines = ["# qdefend compare: does privacy survive int8 quantization?", ""]
    cfg = report["config"]
    named = ", ".join(f"{a}: {p}" for a, p in sorted(cfg.get("presets", {}).items()))
    how = "quick presets" if cfg["quick"] else ("presets " + named if named else "default settings")
    lines += [f"Attacks: {', '.join(cfg['attacks'])} ({how}, "
              f"seed {cfg['seed']}). Artifacts: {', '.join(cfg['artifacts'])}. Every number is on the private "
              "test images; inversion figures are means with 95% bootstrap intervals, next to the mean-image "
              "floor (an attack that does not beat it learned nothing about the individual image).", ""]
    for entry in report["runs"]:
        lines += [f"## {entry['run']}", ""]
        steps = entry.get("defense", {}).get("steps", [])
        lines += [f"Trained with: {entry.get('trained_with') or '-'}. Release transform on the device: "
                  f"{', '.join(json.dumps(s) for s in steps) if steps else 'none'}.", ""]
        lines += ["| artifact | test acc | attack | MSE | PSNR | SSIM | floor MSE | converged | clone acc | fidelity "
                  "| time s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        unconverged = False
        for art, a in entry["artifacts"].items():
            for attack, r in a["attacks"].items():
                m = r["metrics"]
                conv = "-" if "converged" not in m else ("yes" if m["converged"] else "**no: lower bound**")
                unconverged |= conv.startswith("**no")
                lines.append("| " + " | ".join([
                    f"`{art}`", _fmt(a.get("test_acc"), "acc"), attack,
                    _fmt(m.get("mse"), "mse") + _ci(m, "mse") if "mse" in m else "-",
                    _fmt(m.get("psnr"), "psnr") if "psnr" in m else "-",
                    _fmt(m.get("ssim"), "ssim") + _ci(m, "ssim") if "ssim" in m else "-",
                    _fmt(m.get("baseline_mse"), "mse") if "baseline_mse" in m else "-", conv,
                    _fmt(m.get("clone_acc"), "clone_acc") if "clone_acc" in m else "-",
                    _fmt(m.get("fidelity"), "fidelity") if "fidelity" in m else "-",
                    f"{r['timings'].get('total_s', 0):.0f}"]) + " |")
        lines.append("")
        if unconverged:
            lines += ["An inversion attack marked *no* had not converged (its held-out MSE still fell by 2% or more "
                      "over its last 20% of epochs): its figures are a lower bound on what leaks, not a privacy "
                      "figure. Re-run it with more epochs (`qdefend attack RUN --attack NAME --set epochs=N`).", ""]
        curves = [(art, attack, r) for art, a in entry["artifacts"].items() for attack, r in a["attacks"].items()
                  if any(k.startswith("fidelity@") for k in r["metrics"])]
        if curves:
            budgets = sorted({int(k.split("@")[1]) for _, _, r in curves for k in r["metrics"] if k.startswith("fidelity@")})
            lines += ["Extraction fidelity per query budget:", "",
                      "| artifact | attack | " + " | ".join(str(b) for b in budgets) + " |",
                      "|---|---|" + "---|" * len(budgets)]
            for art, attack, r in curves:
                lines.append(f"| `{art}` | {attack} | " + " | ".join(
                    _fmt(r["metrics"].get(f"fidelity@{b}"), "fidelity") for b in budgets) + " |")
            lines.append("")
        if entry["verdicts"]:
            lines += ["Verdicts (int8 vs float, same attack and test images):", ""]
            lines += [f"- **{v['attack']}**, `{v['int8_artifact']}` vs `{v['float_artifact']}`: {v['text']}"
                      for v in entry["verdicts"]]
            lines.append("")
        for fig in entry["figures"]:
            rel = Path(fig).relative_to(out) if Path(fig).is_relative_to(out) else Path(fig)
            lines += [f"![reconstructions]({rel.as_posix()})", ""]
        notes = sorted({n for a in entry["artifacts"].values() for r in a["attacks"].values() for n in r["notes"]})
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    if report.get("baseline"):
        lines += _render_gains(report, out)
    lines.append(f"Total time {report['timings']['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def _render_gains(report: dict, out: Path) -> list[str]:
    """The section "what each defense buys": every defended run against the baseline, per artifact."""
    base = report["baseline"]
    lines = [f"## What each defense buys, against `{base}`", "",
             "Same attack settings and the same private test images on both models. Test accuracy is what a device "
             "delivers (release transform applied); an unconverged attack on either side makes the gain an estimate "
             "from lower bounds on both leaks.", "",
             "| run | artifact | test acc (vs baseline) | attack | metric | defended | baseline | change | significant gain |",
             "|---|---|---|---|---|---|---|---|---|"]
    texts = []
    for e in report["runs"]:
        for g in e.get("gains", []):
            acc = _fmt(g["acc_defended"], "acc")
            if g["acc_change_points"] is not None:
                acc += f" ({g['acc_change_points']:+.2f} pts)"
            change = f"{g['ratio']:.2f}x" if g["metric"] == "mse" and g["ratio"] else (
                f"{100 * g['diff']:+.2f} pts" if g["metric"] == "fidelity" else f"{g['diff']:+.3f}")
            lines.append(f"| {e['name']} | `{g['artifact']}` | {acc} | {g['attack']} | {g['metric']} | "
                         f"{_fmt(g['defended'], g['metric'])} | {_fmt(g['baseline'], g['metric'])} | {change} | "
                         f"{'yes' if g['gains_privacy'] else 'no'}"
                         f"{' (the attack failed: above the floor)' if g.get('attack_failed') else ''} |")
            texts.append(f"- **{e['name']}**, {g['attack']} on `{g['artifact']}`: {g['text']}")
    lines += [""] + texts + [""]
    for fig in report.get("gain_figures", []):
        rel = Path(fig).relative_to(out) if Path(fig).is_relative_to(out) else Path(fig)
        lines += [f"![reconstructions, every run]({rel.as_posix()})", ""]
    return lines
