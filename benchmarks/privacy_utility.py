"""Privacy-utility trade-off of the defenses on Fashion-MNIST: accuracy vs inversion error, int8.

    python benchmarks/privacy_utility.py [--size quick|full] [--configs none,noise,...]
                                         [--artifacts encoder.int8.tflite] [--threads N]
                                         [--out DIR] [--runs-dir DIR]

For every defense config (none, Gaussian noise at two sigmas, noise+CEM, NoPeek at alpha 1/2/4,
noise+NoPeek, noise+NoPeek+CEM, feature dropout, ARL, PATROL, and the model cut deeper: ``cut-3``,
``cut-4``, ``cut-6``, N convs on the device instead of two, and ``cut-4+nopeek``) it trains a QAT int8 run
(``qdefend.train.Trainer``), exports it (``qdefend.export.export_run``), and attacks each released
encoder artifact with the black-box inverse network (``decoder``, noise-aware; Paper: He et al.,
"Model inversion attacks against collaborative inference", ACSAC 2019) and the encoder clone +
regularised MLE (``clone_rmle``, same paper), both through ``qdefend.attacks.runner.attack_run``
on the run loaded once. Defense papers: NoPeek (Vepakomma et al., 2020), CEM (Xia et al., CVPR
2025, arXiv 2503.00383), ARL / ResSFL (Li et al., CVPR 2022); see the defense modules' docstrings.

One row per config x artifact: the defense stack and parameters, test accuracy (``metrics.jsonl``
"test" event: int8 and fake-quant; the manifest's verification of the artifact: plain and, for a
random release, with the release the device applies), decoder MSE/PSNR/SSIM and the attacker's
no-information baseline MSE, clone_rmle MSE/SSIM, and training time (sum of the epochs'
``time_s``). Rows are built from the files the run directories hold, so a re-run skips every stage
whose output already exists (training, export, each attack) and only adds what is missing.

Output under --out: ``privacy_utility.json`` (rows, machine, settings), ``privacy_utility.csv``
(rows), ``privacy_utility.md`` (the README table) and ``privacy_utility.png`` (accuracy vs decoder
MSE with the Pareto front, matplotlib); the Markdown marks the rows on that front. ``--size quick``
is a CI smoke test (512 training images, 1 epoch of batch 32, attack preset "quick", 2 configs);
``--size full`` trains 2 epochs on the whole data with the attacks' default settings, every config.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

HERE = Path(__file__).resolve().parent
ATTACKS = ("decoder", "clone_rmle")

# name -> DefenseConfig dict (qdefend.config.DefenseConfig); parameters not named keep their defaults
CONFIGS: dict[str, dict[str, Any]] = {
    "none": {"stack": "none", "params": {}},
    "noise-0.05": {"stack": "noise", "params": {"noise": {"sigma": 0.05}}},
    "noise": {"stack": "noise", "params": {"noise": {"sigma": 0.1}}},
    "noise+cem": {"stack": "noise+cem", "params": {"noise": {"sigma": 0.1}, "cem": {}}},
    "nopeek": {"stack": "nopeek", "params": {"nopeek": {"alpha": 1.0}}},
    "nopeek-2": {"stack": "nopeek", "params": {"nopeek": {"alpha": 2.0}}},
    "nopeek-4": {"stack": "nopeek", "params": {"nopeek": {"alpha": 4.0}}},
    "noise+nopeek": {"stack": "noise+nopeek", "params": {"noise": {"sigma": 0.1}, "nopeek": {"alpha": 1.0}}},
    "noise+nopeek+cem": {"stack": "noise+nopeek+cem",
                         "params": {"noise": {"sigma": 0.1}, "nopeek": {"alpha": 1.0}, "cem": {}}},
    "dropout": {"stack": "dropout", "params": {"dropout": {"p": 0.2}}},
    "arl": {"stack": "arl", "params": {"arl": {"alpha": 1.0, "tau": 0.5}}},
    "patrol": {"stack": "patrol", "params": {"patrol": {"alpha": 1.0, "tau": 0.5, "ratio": 0.05, "prune_epoch": 1}}},
    "cut-3": {"stack": "none", "params": {}},
    "cut-4": {"stack": "none", "params": {}},
    "cut-6": {"stack": "none", "params": {}},
    "cut-4+nopeek": {"stack": "nopeek", "params": {"nopeek": {"alpha": 1.0}}},
}
# name -> ModelConfig fields that differ from the reference split (qdefend.models): where to cut is a
# defense too (a deeper cut releases features that more layers have abstracted; the device computes more)
MODEL_CHANGES: dict[str, dict[str, Any]] = {"cut-3": {"cut": 3}, "cut-4": {"cut": 4}, "cut-6": {"cut": 6},
                                            "cut-4+nopeek": {"cut": 4}}

SIZES: dict[str, dict[str, Any]] = {
    "quick": {"data": {"limit_train": 512, "limit_test": 300, "val_size": 200, "aux_size": 1000},
              "train": {"epochs": 1, "batch_size": 32}, "preset": "quick", "verify_images": 100, "configs": ["none", "noise"]},
    "full": {"data": {}, "train": {"epochs": 2}, "preset": None, "verify_images": None, "configs": list(CONFIGS)},
}

COLUMNS = ["config", "seed", "stack", "params", "artifact", "test_acc", "test_acc_source", "test_acc_int8",
           "test_acc_fakequant", "test_acc_artifact", "test_acc_release", "decoder_mse", "decoder_psnr",
           "decoder_ssim", "decoder_baseline_mse", "clone_rmle_mse", "clone_rmle_ssim", "clone_rmle_baseline_mse",
           "epochs", "train_time_s", "decoder_time_s", "clone_rmle_time_s"]


# ----------------------------------------------------------------------------------- configs


def parse_configs(text: str | None, size: str) -> list[str]:
    """``"none,noise"`` -> ["none", "noise"]; None -> the size's default list; unknown names refused."""
    if text is None:
        return list(SIZES[size]["configs"])
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown config {bad[0] if bad else repr(text)}: choose from {', '.join(CONFIGS)} "
            "(comma-separated, e.g. --configs none,noise)")
    return list(dict.fromkeys(names))


def run_config(name: str, size: str, seed: int = 0) -> dict[str, Any]:
    """The RunConfig dict of config `name` at `size`: QAT int8 on Fashion-MNIST with its defense,
    trained with ``seed``."""
    s = SIZES[size]
    return {"data": {"name": "fashion-mnist", **s["data"]}, "quant": {"scheme": "int8"},
            "train": {**s["train"], "seed": seed}, "defense": json.loads(json.dumps(CONFIGS[name])),
            **({"model": dict(MODEL_CHANGES[name])} if name in MODEL_CHANGES else {})}


def run_dirname(name: str, seed: int = 0) -> str:
    """``noise+cem`` -> ``noise_cem`` (seed 0), ``noise_cem-s1`` (seed 1)."""
    return name.replace("+", "_") + (f"-s{seed}" if seed else "")


# ----------------------------------------------------------------------------------- rows


def build_row(name: str, defense: dict[str, Any], artifact: str, records: list[dict], manifest: dict,
              attacks: dict[str, dict], seed: int = 0) -> dict[str, Any]:
    """One result row from a run's metrics records, manifest and attack result JSONs (by attack name).

    ``test_acc`` is what a device user gets: the artifact with its release (noise, dropout) when
    verification measured it, else the artifact's plain accuracy, else the torch int8 accuracy."""
    from qdefend.run import train_summary

    ver = manifest.get("verification", {}).get("artifacts", {}).get(artifact, {})
    row: dict[str, Any] = {"config": name, "seed": seed, "stack": defense.get("stack", "none"),
                           "params": defense.get("params", {}), "artifact": artifact, **train_summary(records),
                           "test_acc_artifact": ver.get("test_acc"), "test_acc_release": ver.get("test_acc_release")}
    for key in ("test_acc_release", "test_acc_artifact", "test_acc_int8"):
        if row[key] is not None:
            row["test_acc"], row["test_acc_source"] = row[key], key
            break
    else:
        row["test_acc"], row["test_acc_source"] = None, None
    want = {"decoder": ("mse", "psnr", "ssim", "baseline_mse"), "clone_rmle": ("mse", "ssim", "baseline_mse")}
    for attack, keys in want.items():
        res = attacks.get(attack) or {}
        m = res.get("metrics", {})
        for k in keys:
            row[f"{attack}_{k}"] = m.get(k)
        row[f"{attack}_time_s"] = res.get("timings", {}).get("total_s")
    return {c: row.get(c) for c in COLUMNS}


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else ("" if v is None else v)
                        for k, v in r.items()})


MEANS = ("test_acc", "decoder_mse", "decoder_ssim", "clone_rmle_mse", "clone_rmle_baseline_mse", "train_time_s")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per config x artifact (in first-seen order) over its seeds: ``seeds`` (their list),
    the mean of each of :data:`MEANS` and its sample std (``KEY_std``; None with one seed or a
    missing value)."""
    from qdefend.analysis.seeds import aggregate_seeds

    blank = {k: None for m in MEANS for k in (m, f"{m}_std")}
    return [{**blank, **a} for a in aggregate_seeds(rows, by=("config", "artifact"), keys=MEANS)]


def markdown(rows: list[dict]) -> str:
    """The README table: one line per config x artifact (mean ± std over its seeds), decoder MSE also
    as a ratio to the undefended row's, accuracy as points against it, and the rows on the Pareto
    front of (decoder MSE, accuracy).

    A ``clone_rmle`` MSE at or above its mean-image floor is marked: the attack learned nothing
    about the individual image there, which says the attack failed, not that the defense holds."""
    from qdefend.analysis.plot import pareto_front
    from qdefend.analysis.seeds import mean_pm as f

    rows = aggregate(rows)
    ref = {r["artifact"]: r["decoder_mse"] for r in rows if r["config"] == "none" and r["decoder_mse"]}
    ref_acc = {r["artifact"]: r["test_acc"] for r in rows if r["config"] == "none" and r["test_acc"] is not None}
    on_front = set()
    for art in {r["artifact"] for r in rows}:
        mine = [r for r in rows if r["artifact"] == art and r["decoder_mse"] is not None and r["test_acc"] is not None]
        on_front |= {id(mine[i]) for i in pareto_front([(r["decoder_mse"], r["test_acc"]) for r in mine])}

    out = ["| config | seeds | artifact | test acc % (vs none) | decoder MSE (x none) | decoder SSIM | clone_rmle MSE | "
           "Pareto front | train min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ref.get(r["artifact"])
        ratio = f" ({r['decoder_mse'] / base:.2f}x)" if base and r["decoder_mse"] is not None else ""
        clone = f(r, "clone_rmle_mse", ".4f")
        if r["clone_rmle_mse"] is not None and r["clone_rmle_baseline_mse"] is not None \
                and r["clone_rmle_mse"] >= r["clone_rmle_baseline_mse"]:
            clone += " (above floor: attack failed)"
        acc = f(r, "test_acc", ".2f", 100)
        if r["test_acc"] is not None and ref_acc.get(r["artifact"]) is not None:
            acc += f" ({100 * (r['test_acc'] - ref_acc[r['artifact']]):+.2f})"
        mins = f(r, "train_time_s", ".1f", 1 / 60)
        out.append(f"| {r['config']} | {len(r['seeds'])} | {r['artifact']} | {acc} | {f(r, 'decoder_mse', '.4f')}{ratio} | "
                   f"{f(r, 'decoder_ssim', '.3f')} | {clone} | {'yes' if id(r) in on_front else ''} | {mins} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------- plot


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="quick", help="quick (CI smoke) or full (default quick)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated, from {', '.join(CONFIGS)} (default: none,noise for quick, all for full)")
    p.add_argument("--artifacts", default="encoder.int8.tflite",
                   help="comma-separated encoder artifacts to attack (default encoder.int8.tflite)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, from {', '.join(ATTACKS)} (default: both)")
    p.add_argument("--preset", action="append", default=[], metavar="ATTACK=PRESET",
                   help="an attack's preset instead of the size's (e.g. --preset decoder=fast: the demo's lighter "
                        "decoder); the settings and each result record it")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0); each seed but 0 trains "
                   "into RUNS_DIR/NAME-sS, and the table gives mean ± std over them")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "privacy_utility")
    p.add_argument("--runs-dir", type=Path, default=Path("runs") / "privacy_utility")
    args = p.parse_args(argv)
    try:
        args.configs = parse_configs(args.configs, args.size)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    args.artifacts = [a.strip() for a in args.artifacts.split(",") if a.strip()]
    bad = [a for a in args.artifacts if not (a.startswith("encoder.") and a.endswith((".tflite", ".onnx")))]
    if bad or not args.artifacts:
        p.error(f"--artifacts: expected encoder artifacts such as encoder.int8.tflite,encoder.int8.onnx, got {bad or '(none)'}")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0 = torch's default)")
    try:
        args.seeds = list(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip()))
    except ValueError:
        args.seeds = []
    if not args.seeds or min(args.seeds) < 0:
        p.error(f"--seeds: expected comma-separated seeds >= 0 such as 0,1,2, got {args.seeds!r}")
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not args.attacks or any(a not in ATTACKS for a in args.attacks):
        p.error(f"--attacks: choose from {', '.join(ATTACKS)}, got {args.attacks or '(none)'}")
    from qdefend.attacks.base import AttackError
    from qdefend.attacks.report import parse_presets

    try:
        args.preset = parse_presets(args.preset, ATTACKS)
    except AttackError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qdefend.attacks import AttackError
    from qdefend.edge.manifest import ArtifactError
    from qdefend.errors import QdefendError
    from qdefend.run import RunPaths

    from qdefend.analysis.plot import scatter_plot
    from qdefend.machine import load_average, machine_info
    from qdefend.stages import ensure_attacks, ensure_exported, ensure_trained

    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    started, t_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    rows: list[dict] = []
    try:
        jobs = [(name, seed) for name in args.configs for seed in args.seeds]
        for i, (name, seed) in enumerate(jobs, 1):
            root = args.runs_dir / run_dirname(name, seed)
            say = lambda msg, tag=f"[{i}/{len(jobs)} {name} seed {seed}]": print(f"{tag} {msg}", file=sys.stderr, flush=True)  # noqa: E731
            ensure_trained(root, run_config(name, args.size, seed), threads=args.threads, say=say)
            manifest = ensure_exported(root, args.artifacts, verify_images=size["verify_images"], say=say)
            records = RunPaths(root).read_metrics()
            holder: dict = {}
            for art in args.artifacts:
                results = {}
                for attack in args.attacks:
                    results.update(ensure_attacks(root, art, [attack], preset=args.preset.get(attack, size["preset"]),
                                                  threads=args.threads or None, say=say, run_holder=holder))
                row = build_row(name, CONFIGS[name], art, records, manifest, results, seed=seed)
                rows.append(row)
                say(f"row: acc {row['test_acc']} ({row['test_acc_source']}), decoder mse {row['decoder_mse']}")
    except (QdefendError, AttackError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "qdefend.privacy_utility", "schema_version": 1, "started": started,
              "command": " ".join(["python", "benchmarks/privacy_utility.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "load_average_end": load_average(),
              "settings": {"size": args.size, "configs": args.configs, "seeds": args.seeds, "artifacts": args.artifacts,
                           "data": size["data"], "train": size["train"], "attack_preset": size["preset"] or "default",
                           "attack_presets": {a: args.preset.get(a, size["preset"] or "default") for a in args.attacks},
                           "attacks": args.attacks, "verify_images": size["verify_images"],
                           "threads": args.threads or torch.get_num_threads(), "runs_dir": str(args.runs_dir),
                           "defenses": {n: CONFIGS[n] for n in args.configs},
                           "model_changes": {n: MODEL_CHANGES[n] for n in args.configs if n in MODEL_CHANGES},
                           "wall_s": round(time.perf_counter() - t_start, 1)},
              "rows": rows}
    (args.out / "privacy_utility.json").write_text(json.dumps(result, indent=2) + "\n")
    write_csv(rows, args.out / "privacy_utility.csv")
    (args.out / "privacy_utility.md").write_text(markdown(rows))
    pts = [(f"{r['config']} ({r['artifact'].split('.')[-1]})" if len(args.artifacts) > 1 else r["config"],
            r["decoder_mse"], r["test_acc"], r["decoder_mse_std"], r["test_acc_std"]) for r in aggregate(rows)
           if r["decoder_mse"] is not None and r["test_acc"] is not None]
    scatter_plot(pts, args.out / "privacy_utility.png", front=True,
                 title=f"privacy vs utility (int8, Fashion-MNIST; seeds {','.join(map(str, args.seeds))})")
    print(f"{'config':18s} {'seed':>4s} {'artifact':22s} {'acc':>7s} {'dec mse':>8s} {'dec ssim':>8s} {'clone mse':>9s} {'train s':>8s}")
    for r in rows:
        f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{r['config']:18s} {r['seed']:4d} {r['artifact']:22s} {f(r['test_acc'], '7.4f')} {f(r['decoder_mse'], '8.4f')} "
              f"{f(r['decoder_ssim'], '8.3f')} {f(r['clone_rmle_mse'], '9.4f')} {f(r['train_time_s'], '8.1f')}")
    print(f"wrote {args.out / 'privacy_utility.json'}, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
