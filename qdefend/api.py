"""The Python API: the pipeline's stages as functions, for notebooks and scripts.

    import qdefend.api as qd

    run = qd.train({"train": {"epochs": 2}, "defense": {"stack": "noise"}}, "runs/noise")
    exported = qd.export(run.root)
    result = qd.attack(run.root, "decoder", target="encoder.int8.tflite", preset="fast")
    print(run.test["test_acc_int8"], exported.artifacts["encoder.int8.tflite"], result.metrics["mse"])
    report = qd.compare([run.root], attacks=("decoder", "knockoff"))

Every function returns a typed result (paths and metrics) and raises :class:`qdefend.QdefendError`
(one line saying what is wrong and what to do) on bad input; the ``qdefend`` command line is a thin
layer over these functions. (They live in ``qdefend.api``, not on ``qdefend`` itself, because
``qdefend.train`` and ``qdefend.export`` are the modules that implement them.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import RunConfig, apply_overrides, read_toml, resume_config
from .errors import QdefendError

__all__ = ["TrainedRun", "ExportedRun", "Report", "config", "train", "export", "attack", "compare"]

Progress = Callable[[str], None]


@dataclass
class TrainedRun:
    """A trained run: its directory, config and final test metrics."""

    root: Path
    config: RunConfig
    test: dict[str, Any]  # the final "test" event: test_acc_float / test_acc_fakequant / test_acc_int8
    changed: dict[str, list] = field(default_factory=dict)  # what a resume changed, {key: [old, new]}


@dataclass
class ExportedRun:
    """An exported run: its manifest and the path of every artifact."""

    root: Path
    manifest: dict[str, Any]
    artifacts: dict[str, Path]

    @property
    def verification(self) -> dict[str, Any]:
        return self.manifest.get("verification", {})


@dataclass
class Report:
    """A ``compare`` report: where it was written and what it holds (report.json's content)."""

    out: Path
    data: dict[str, Any]

    @property
    def verdicts(self) -> list[dict]:
        return [v for r in self.data["runs"] for v in r["verdicts"]]


def config(base: RunConfig | dict | str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """A validated :class:`RunConfig` from a RunConfig, a dict or a TOML file (e.g. a run's
    config.toml), with ``--set``-style ``overrides`` ("train.lr=0.01") applied on top."""
    if isinstance(base, RunConfig):
        d = base.to_dict()
    elif isinstance(base, dict):
        d = copy.deepcopy(base)  # --set overrides write into nested tables: never into the caller's
    elif base is None:
        d = {}
    else:
        path = Path(base)
        if not path.is_file():
            raise QdefendError(f"config {path}: no such file")
        d = read_toml(path, f"config {path}")
    apply_overrides(d, list(overrides))
    return RunConfig.from_dict(d)


def train(cfg: RunConfig | dict | str | Path | None = None, out: str | Path | None = None, *,
          overrides: Iterable[str] = (), resume: bool = False, resume_flags: dict[str, Any] | None = None,
          console: Any = None, progress: bool = False) -> TrainedRun:
    """Train a split network into ``out`` (default ``runs/MODEL-DATASET-DEFENSE-QAT``).

    ``resume``: continue ``out`` from its latest checkpoint; ``overrides`` (and ``resume_flags``,
    e.g. ``{"train.epochs": 4}``) may then change only what a resume may
    (:data:`qdefend.config.RESUMABLE`: epochs, learning rate, schedule, device, threads...), and
    ``cfg`` must be None.
    """
    from .train import Trainer

    changed: dict[str, list] = {}
    if resume:
        if out is None:
            raise QdefendError("resume needs the run directory to continue (--out RUN_DIR)")
        if cfg is not None:
            raise QdefendError("a resume continues the run as it was configured: pass no config (drop --config)")
        run_cfg, changed = resume_config(RunConfig.load(Path(out) / "config.toml"), list(overrides), resume_flags)
    else:
        run_cfg = config(cfg, overrides)
        if out is None:
            out = Path("runs") / (f"{run_cfg.model.name}-{run_cfg.data.name}-"
                                  f"{run_cfg.defense.stack.replace('+', '_')}-{run_cfg.quant.scheme}")
    rec = Trainer(run_cfg, out, console=console, progress=progress).fit(resume=resume, changed=changed)
    return TrainedRun(Path(out), run_cfg, rec, changed)


def _exported(root: Path, manifest: dict) -> ExportedRun:
    return ExportedRun(root, manifest, {name: root / e["path"] for name, e in manifest["artifacts"].items()})


def export(run: str | Path, formats: Iterable[str] = ("onnx", "tflite"), *, calibrate: int | None = None,
           verify_images: int | None = None, progress: Progress | None = None) -> ExportedRun:
    """Export the run's int8 encoder (and cloud head), verify every artifact, write manifest.json."""
    from .export.pipeline import export_run

    root = Path(run)
    return _exported(root, export_run(root, list(formats), calibrate=calibrate, verify_images=verify_images,
                                      progress=progress))


def attack(run: str | Path, attack: str, target: str = "encoder.int8.tflite", *, preset: str | None = None,
           params: dict[str, Any] | None = None, budget: str | None = None, seed: int = 0,
           threads: int | None = None, output: str = "probabilities", service_output: str | None = None,
           save: bool = True, progress: Progress | None = None):
    """Run one attack (``qdefend list attacks``) on one target of the run; returns its
    :class:`~qdefend.attacks.AttackResult` (saved as ``RUN/attacks/ATTACK-TARGET.json``, its path
    in ``result.extra["path"]``)."""
    from .attacks.runner import attack_run

    res, path = attack_run(run, target, attack, preset=preset, params=params, budget=budget, seed=seed,
                           threads=threads, output=output, progress=progress, save=save, service_output=service_output)
    res.extra["path"] = str(path)
    return res


def compare(runs: Iterable[str | Path], *, out: str | Path | None = None, progress: Progress | None = None,
            **settings: Any) -> Report:
    """Attack the float and int8 artifacts of every run and write the report (``qdefend compare``);
    ``settings`` are :class:`qdefend.attacks.report.CompareConfig` fields (attacks, artifacts,
    quick, presets, params, seed, jobs, force)."""
    from .attacks.report import CompareConfig, compare as run_compare

    try:
        cfg = CompareConfig(**settings)
    except TypeError as e:
        raise QdefendError(f"compare: {e}") from None
    data = run_compare(list(runs), cfg, out=out, progress=progress)
    return Report(Path(data["out"]), data)
