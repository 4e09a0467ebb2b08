"""The analysis model of ``qdefend partition``: every stage on the edge, briefly trained.

:func:`plan_analysis` turns a :class:`~qdefend.analysis.partition.PartitionConfig` into the
:class:`~qdefend.config.RunConfig` of that model: the deepest cut, no bottleneck and no sigmoid (so
``stage_outputs`` gives what each cut k would release without a bottleneck), float training
(scheme "none"), and the data split of the ``--from`` run when there is one. :func:`ensure_model`
trains it with the project's :class:`~qdefend.train.Trainer` into ``OUT/model`` -- a normal run
directory, reused when it already holds the same finished run and resumed when interrupted.

With ``--from RUN`` the run's trained edge (stem and stages 1..cut; a QAT run's float weights,
whose names the pt2e graph keeps) is spliced into the fresh model and frozen -- no gradient, and BN
kept in eval mode so its statistics stay the run's -- while the deeper stages and the classifier
train on top of it.

Paper: Liu et al., "Partitioning for Intrinsic Model Inversion Resistance in Collaborative
Inference" (GPZ), arXiv 2506.15412: candidate cuts of one trained network.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import QdefendError
from ..config import RunConfig, TrainConfig
from ..data import DataConfig
from ..defenses import parse_stack
from ..models import ModelConfig, MODELS, build_model, valid_cuts
from ..quant import QuantConfig
from ..checkpoint import load_checkpoint
from ..run import RunPaths, load_run
from ..train import Trainer
from ..stages import ensure_trained

if TYPE_CHECKING:
    from .partition import PartitionConfig

__all__ = ["AnalysisPlan", "plan_analysis", "ensure_model", "say"]


def say(console, msg: str) -> None:
    if console is not None:
        console.print(msg)


@dataclass
class AnalysisPlan:
    """The resolved analysis: its run config, sigma, and what --from brings."""

    run_cfg: Any
    sigma: float
    out: Path
    from_cut: int | None = None
    frozen: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_analysis(cfg: "PartitionConfig") -> AnalysisPlan:
    """Resolve names, width, sigma, data split and output folder (reads the --from run's config)."""

    notes: list[str] = []
    src = RunConfig.load(Path(cfg.from_run) / "config.toml") if cfg.from_run else None
    name, dataset, width, sigma = cfg.model, cfg.dataset, cfg.width, cfg.sigma
    if src is not None:
        for what, mine, theirs, flag in (("model", name, src.model.name, "--model"),
                                         ("dataset", dataset, src.data.name, "--dataset"),
                                         ("width", width, src.model.width, "--width")):
            if mine is not None and mine != theirs:
                raise QdefendError(f"--from {cfg.from_run} is a {what} {theirs} run, but {flag} {mine} was asked: "
                                   f"drop {flag} (it follows the run) or use {flag} {theirs}")
        name, dataset, width = src.model.name, src.data.name, src.model.width
        stack = parse_stack(src.defense.stack)
        if sigma is None:
            sigma = float(src.defense.params.get("noise", {}).get("sigma", 0.1)) if "noise" in stack else 0.0
        other = [d for d in stack if d != "noise"]
        if other:
            notes.append(f"the run's defenses {'+'.join(other)} are not modelled: only Gaussian noise "
                         f"(sigma {sigma:g}) is applied to the features")
        data = dataclasses.replace(src.data, limit_train=cfg.limit_train, limit_test=cfg.limit_eval,
                                   data_dir=cfg.data_dir or src.data.data_dir)
    else:
        data = DataConfig(name=dataset or "fashion-mnist", data_dir=cfg.data_dir, limit_train=cfg.limit_train,
                          limit_test=cfg.limit_eval)
    name = name or "vgg11_bn"
    width = width or 0.5
    fam = MODELS.get(name)
    narrowest = min(max(1, round(s.channels * width)) for s in (*fam.stages, *([fam.stem] if fam.stem else [])))
    run_cfg = RunConfig(
        data=data,
        model=ModelConfig(name, cut=max(valid_cuts(name)), bottleneck_channels=0, sigmoid=False,
                          width=width, head_width=1.0),
        quant=QuantConfig(scheme="none"),
        # channels-last mkldnn convs abort (SIGBUS) on < 6-channel layers in torch 2.13 CPU builds
        train=TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                          channels_last=narrowest >= 8),
        init_from=str(cfg.from_run) if cfg.from_run else None,
    )
    out = Path(cfg.out) if cfg.out else Path("runs") / f"partition-{name}-{data.name}"
    plan = AnalysisPlan(run_cfg=run_cfg, sigma=float(sigma or 0.0), out=out, notes=notes)
    if src is not None:
        plan.from_cut = src.model.resolved_cut
        plan.frozen = (["stem"] if fam.stem is not None else []) + \
            [f"stage{k}" for k in range(1, plan.from_cut + 1)]
    return plan


def _edge_init(plan: AnalysisPlan, data) -> dict[str, dict[str, torch.Tensor]]:
    """Fresh analysis weights with the --from run's edge (stem, stages 1..cut) spliced in."""

    paths = RunPaths(plan.run_cfg.init_from)
    paths.require_trained()
    parts, _, _ = load_checkpoint(paths.checkpoints, "best" if (paths.checkpoints / "best.json").is_file()
                                  else "latest", with_optimizer=False)
    torch.manual_seed(plan.run_cfg.train.seed)
    model = build_model(plan.run_cfg.model, data.shape, data.num_classes)
    enc = model.encoder.state_dict()
    theirs = parts["encoder"]
    for key in [k for k in enc if k.split(".")[0] in plan.frozen]:
        if key not in theirs or tuple(theirs[key].shape) != tuple(enc[key].shape):
            raise QdefendError(f"--from {paths.root}: its encoder has no tensor {key} of shape {tuple(enc[key].shape)} "
                               "(another architecture?); train it with `qdefend train` at this model and width")
        enc[key] = theirs[key].to(enc[key].dtype)
    return {"encoder": enc, "head": model.head.state_dict()}


def _trainer_cls():
    class _AnalysisTrainer(Trainer):
        """The project's Trainer, with a spliced initialisation and frozen edge stages (--from):
        the stages named in ``frozen`` go through the Trainer's own freezing (no gradient step, eval
        mode every epoch, so BN statistics stay the run's)."""

        def __init__(self, *a, float_init=None, frozen=(), **kw):
            super().__init__(*a, **kw)
            self.float_init, self.frozen = float_init, list(frozen)

        def _init_weights(self):
            return {"float": self.float_init} if self.float_init is not None else None

        def _freeze(self, net):
            stages = [m for name, m in net.encoder.named_children() if name in self.frozen]
            for m in stages:
                m.requires_grad_(False)
            return stages + super()._freeze(net)

    return _AnalysisTrainer


def ensure_model(plan: AnalysisPlan, data, console, progress: bool):
    """Train the analysis model into OUT/model, or reuse / resume the one already there
    (:func:`qdefend.stages.ensure_trained`)."""

    root = plan.out / "model"
    m = plan.run_cfg.model

    def make_trainer(cfg, root, *, resume, console, progress):
        init = _edge_init(plan, data) if cfg.init_from and not resume else None
        say(console, f"training {m.name} (width {m.width:g}, all {m.cut} stages) for {cfg.train.epochs} "
                     f"epoch(s) on {len(data.train)} images -> {root}")
        return _trainer_cls()(cfg, root, console=console, progress=progress, float_init=init, frozen=plan.frozen)

    t0 = time.perf_counter()
    trained = ensure_trained(root, plan.run_cfg, make_trainer=make_trainer, console=console, progress=progress,
                             say=lambda msg: say(console, msg))
    run = load_run(root, data=data)
    return run, trained.test.get("test_acc_float"), time.perf_counter() - t0
