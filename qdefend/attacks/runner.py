"""Run one attack on one target of a run and keep what it found: what ``qdefend attack`` does.

:func:`attack_run` opens the run and the target (an artifact through qdefend.edge.runtime, a
torch encoder, or a service), builds the attack from its name, preset and ``--set`` parameters,
runs it and writes ``runs/NAME/attacks/ATTACK-TARGET.json`` (config, seed, metrics, timings,
notes) and, for inversion attacks, ``ATTACK-TARGET.png`` (originals above reconstructions) and
``.npz`` (the arrays). Extraction attacks read a service's answers: given an encoder artifact
they attack ``service:ARTIFACT`` (that encoder + the exported cloud head) and say so.

One file per attack variant: the full name is ``ATTACK-TARGET[@SERVICEOUTPUT][~VARIANT].json``,
``@TAG`` behind a service-side output defense and ``~VARIANT`` for an attack protocol other than
the default (``Attack.variant()``: ``~pool-mnist5k`` for an extraction from a transfer set,
``~frozen`` for repurposing probes trained on a reference run), so no variant overwrites another
and the default names are those of earlier versions. A saved result is re-used
(:func:`cached_result`) only while its config, seed, preset, service output and the checkpoints
and artifacts of its run and of every run it depends on (``Attack.reference_runs()``) are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .base import ATTACKS, Attack, AttackError, AttackResult, build_attack
from .grid import save_grid
from qdefend.allocator import keep_freed_memory
from qdefend.config import parse_assignment
from qdefend.checkpoint import MODEL_FILE, STATE_FILE, resolve_tag
from qdefend.edge.manifest import ArtifactError, load_manifest
from qdefend.errors import QdefendError
from qdefend.run import RunPaths, load_run
from qdefend.defenses.output import parse_output_defense
from .targets import open_target

__all__ = ["attack_run", "parse_params", "result_path", "resolve_spec", "cached_result", "saved_result",
           "target_fingerprint", "reference_fingerprints", "BUDGET_PARAMS"]

# what --budget sets, per attack family / name (queries the attacker may spend)
BUDGET_PARAMS = {"extraction": "budgets", "decoder": "aux_size", "gan": "aux_size", "repurpose": "n_train",
                 "clone_rmle": "budget"}


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=5", "budgets=1000,5000", "through_twin=true"]`` -> typed dict (TOML values,
    else the raw string)."""

    return dict(parse_assignment(item, "--set", "epochs=10", error=AttackError) for item in items or [])


def budget_param(attack_cls: type[Attack]) -> str | None:
    return BUDGET_PARAMS.get(attack_cls.name) or BUDGET_PARAMS.get(attack_cls.family)


def resolve_spec(attack: Attack, spec: str) -> tuple[str, list[str]]:
    """The target spec the attack really needs: an attack that reads answers (probabilities,
    labels) aimed at an encoder goes to ``service:ENCODER``."""
    if attack.requires & {"probabilities", "labels"} and not spec.startswith(("service:", "zoo:")):
        return f"service:{spec}", [f"{attack.name} reads the service's answers: attacked service:{spec} "
                                   "(that encoder + the exported cloud head)"]
    return spec, []


def _safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def result_path(run_dir: str | Path, attack: str, spec: str, variant: str = "") -> Path:
    """``RUN/attacks/ATTACK-TARGET.json``, or ``...~VARIANT.json`` for a variant (``Attack.variant()``)."""
    return Path(run_dir) / "attacks" / f"{attack}-{_safe(spec)}{'~' + _safe(variant) if variant else ''}.json"


def target_fingerprint(run_dir: str | Path, spec: str) -> dict[str, str]:
    """sha256 of what a result on target ``spec`` was computed from: the run's best checkpoint
    weights and every exported artifact the target runs (the encoder file named in the spec, and the
    cloud head ``head.float.onnx`` behind a ``service:`` target), as the manifest records them.
    A cached result is reused only while its fingerprint is unchanged (retrain or re-export -> rerun)."""
    import json


    paths = RunPaths(run_dir)
    fp: dict[str, str] = {}
    ckpt = paths.checkpoints
    try:
        tag = resolve_tag(ckpt, "best" if (ckpt / "best.json").is_file() else "latest")
        fp["checkpoint"] = json.loads((ckpt / tag / STATE_FILE).read_text())["files"][MODEL_FILE]
    except (QdefendError, OSError, ValueError, KeyError, TypeError):  # no/unreadable checkpoint: nothing to pin
        pass
    names = [n for n in spec.split(":") if n.endswith((".onnx", ".tflite"))]
    if spec.startswith("service:"):
        names.append("head.float.onnx")
    if names:
        try:
            arts = load_manifest(paths.root).get("artifacts", {})
        except ArtifactError:  # not exported: nothing to pin
            arts = {}
        fp.update({n: arts[n]["sha256"] for n in names if isinstance(arts.get(n), dict) and "sha256" in arts[n]})
    return fp


def _service_result_path(run_dir: str | Path, attack: str, spec: str, post, variant: str = "") -> Path:
    """Where a result is saved: ``ATTACK-TARGET.json``, or ``ATTACK-TARGET@TAG.json`` behind a
    service-side output defense ``post`` (an OutputStack, or None); ``~VARIANT`` before ``.json``
    for an attack variant."""
    return result_path(run_dir, attack, spec if post is None else f"{spec}@{post.tag()}", variant)


def reference_fingerprints(attack: Attack, spec: str) -> dict[str, dict[str, str]]:
    """:func:`target_fingerprint` of target ``spec`` in each run ``attack`` depends on besides its
    own (``Attack.reference_runs()``), by name; {} for most attacks."""
    return {name: target_fingerprint(path, spec) for name, path in attack.reference_runs().items()}


def cached_result(run_dir: str | Path, spec: str, attack: Attack, *, seed: int = 0,
                  preset: str | None = None, service_output: str | None = None) -> AttackResult | None:
    """The saved result of ``attack`` (its variant's file) on target ``spec`` (behind
    ``service_output``, as :func:`attack_run` takes it) if it was made with the same attack config,
    seed, preset and service output against the same checkpoint and artifacts
    (:func:`target_fingerprint`), of this run and of every reference run (:func:`reference_fingerprints`);
    None means: run the attack again."""
    import json


    post = parse_output_defense(service_output)
    path = _service_result_path(run_dir, attack.name, spec, post, attack.variant())
    if not path.is_file():
        return None
    try:
        r = AttackResult.load(path)
    except QdefendError:  # unreadable: run the attack again, which rewrites it
        return None
    same = (r.seed == seed and r.extra.get("preset") == (preset or "default")
            and r.config == json.loads(json.dumps(attack.config_dict()))
            and r.extra.get("service_output") == (None if post is None else post.spec())
            and r.extra.get("fingerprint") == target_fingerprint(run_dir, spec)
            and r.extra.get("reference_fingerprints", {}) == reference_fingerprints(attack, spec))
    return r if same else None


def attack_run(run_dir: str | Path, spec: str, attack: str, *, preset: str | None = None,
               params: dict[str, Any] | None = None, budget: str | None = None, seed: int = 0,
               run: Any = None, output: str = "probabilities", threads: int | None = None,
               progress: Callable[[str], None] | None = None, save: bool = True,
               service_output: str | None = None) -> tuple[AttackResult, Path]:
    """Attack target ``spec`` of the run at ``run_dir`` with attack ``attack``; returns the result
    and the path of its JSON (written when ``save``). ``service_output``: a service-side output
    defense (qdefend.defenses.output, e.g. "round:2") on the service's probabilities; the result
    is then written as ``ATTACK-TARGET@TAG.json``. An attack variant (``Attack.variant()``, e.g. a
    transfer-set pool) is written as ``ATTACK-TARGET[@TAG]~VARIANT.json``."""

    keep_freed_memory()
    params = dict(params or {})
    cls = ATTACKS.get(attack)
    if budget is not None:
        key = budget_param(cls)
        if key is None:
            raise AttackError(f"attack '{attack}' has no query budget; set its parameters with --set KEY=VALUE")
        try:
            params[key] = budget if key == "budgets" else int(budget)
        except ValueError:
            raise AttackError(f"--budget {budget!r} is not a number of images: e.g. --budget 5000") from None
    atk = build_attack(attack, preset=preset, **params)
    spec, notes = resolve_spec(atk, spec)
    RunPaths(run_dir).require_trained()
    if run is None:
        run = load_run(run_dir)

    target = open_target(run_dir, spec, run=run, output=output, threads=threads, service_output=service_output)
    result = atk.run(target, run.data, seed=seed, progress=progress)
    if notes:
        result.extra["notes"] = notes + result.notes
    result.extra.setdefault("run", str(run_dir))
    result.extra["preset"] = preset or "default"
    result.extra["fingerprint"] = target_fingerprint(run_dir, spec)
    refs = reference_fingerprints(atk, spec)
    if refs:
        result.extra["reference_fingerprints"] = refs
    post = getattr(target, "post", None)
    if post is not None:
        result.extra["service_output"] = post.spec()
    path = _service_result_path(run_dir, attack, spec, post, atk.variant())
    if save:
        result.save(path)
        if result.reconstructions is not None:
            save_grid([("private test images", result.originals),
                       (f"{attack} on {spec}", result.reconstructions)], path.with_suffix(".png"))
    return result, path


def saved_result(run_dir: str | Path, artifact: str, attack: str, *, preset: str | None = None,
                 params: dict[str, Any] | None = None, seed: int = 0,
                 service_output: str | None = None) -> tuple[Path, AttackResult | None]:
    """``(path, result)``: where ``attack`` (built from its name, preset and params) on ``artifact``
    (behind ``service_output``) is saved, and the saved result if it still stands
    (:func:`cached_result`), else None."""
    atk = build_attack(attack, preset=preset, **dict(params or {}))
    spec, _ = resolve_spec(atk, artifact)
    return (_service_result_path(run_dir, attack, spec, parse_output_defense(service_output), atk.variant()),
            cached_result(run_dir, spec, atk, seed=seed, preset=preset, service_output=service_output))
