"""The run directory is the unit of work: build a run's objects from its config, or load them back.

``train`` writes a run; ``export`` and the attacks load it with :func:`load_run`, so every stage
rebuilds exactly the same network from ``config.toml`` and the checkpoint's safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import quant
from .checkpoint import has_checkpoint, load_checkpoint
from .config import RunConfig
from .data import SplitData, load_dataset
from .defenses import DefenseStack, build_defense
from .edge.release import wire_quant_params
from .errors import QdefendError
from .models import build_model, feature_shape


class RunPaths:
    """Where a run keeps its files (the layout is in the README, 'A run directory')."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.config = self.root / "config.toml"
        self.checkpoints = self.root / "checkpoints"
        self.metrics = self.root / "metrics.jsonl"
        self.artifacts = self.root / "artifacts"
        self.manifest = self.root / "manifest.json"
        self.attacks = self.root / "attacks"
        self.report = self.root / "report"

    def require_trained(self) -> None:
        if not self.config.is_file():
            raise QdefendError(
                f"{self.root} is not a qdefend run (no config.toml): create it with "
                f"`qdefend train --out {self.root}`"
            )
        if not has_checkpoint(self.checkpoints):
            raise QdefendError(
                f"{self.root} has no checkpoint yet: finish training with `qdefend train --out {self.root} --resume`"
            )

    def read_metrics(self, *, skip_bad: bool = False) -> list[dict[str, Any]]:
        """The records of metrics.jsonl. A last line torn by a kill is skipped; any other line that
        is not a record is refused, naming the line (or skipped too, with ``skip_bad``)."""
        if not self.metrics.is_file():
            return []
        lines = [(i, line) for i, line in enumerate(self.metrics.read_text(errors="replace").splitlines(), 1)
                 if line.strip()]
        out = []
        for j, (i, line) in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("event"), str):
                out.append(rec)
            elif not (skip_bad or j == len(lines) - 1):
                raise QdefendError(
                    f"{self.metrics} line {i} is not a metrics record ({line[:40]!r}): delete that line "
                    f"(a resume with `qdefend train --out {self.root} --resume` restores the latest epoch's line)")
        return out


class SplitNet(nn.Module):
    """Edge encoder + cloud head; either part may be a QAT-prepared (fake-quant) graph module,
    whose ``train()``/``eval()`` switch BN and observers (see :class:`qdefend.quant.QATGraphModule`)."""

    def __init__(self, encoder: nn.Module, head: nn.Module, *, q_encoder: bool, q_head: bool,
                 wire: quant.WireQuantizer | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.wire = wire  # the trained wire grid at the cut (a non-default quant.wire_*), else None
        self.q_encoder = q_encoder
        self.q_head = q_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@dataclass
class Run:
    """Everything built from one config."""

    cfg: RunConfig
    data: SplitData
    net: SplitNet
    defense: DefenseStack
    z_shape: tuple[int, ...]
    paths: RunPaths | None = None
    state: dict[str, Any] | None = None  # checkpoint state.json when loaded

    @property
    def quantized(self) -> bool:
        return self.cfg.quant.scheme == "int8"

    def converted_encoder(self) -> nn.Module:
        """The int8 encoder (torch reference kernels) of a QAT run, or the float encoder otherwise."""
        if not self.quantized:
            return self.net.encoder.eval()
        return quant.convert(self.net.encoder)

    def converted_head(self) -> nn.Module:
        if self.net.q_head:
            return quant.convert(self.net.head)
        return self.net.head.eval()

    def release(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """What crosses the wire, in torch: the defenses' release steps and, for a non-default wire,
        its fake-quantized grid in the configured order (the default int8 wire is the encoder's own
        int8 output grid, widened for noise at export)."""
        wq = self.net.wire
        if wq is None:
            return self.defense.release(z, generator)
        if wq.order == "wire_then_release":
            return wq(self.defense.release(wq(z), generator), observe=False)
        return wq(self.defense.release(z, generator))

    def wire_grid(self, out_grid: dict | None = None) -> dict | None:
        """The manifest's ``features.wire``: the trained grid of a non-default wire, else the int8
        grid over the encoder's output range (``[0, 1]`` after a sigmoid, else ``out_grid``, the
        converted encoder's output grid) widened for the release noise; None when neither is known."""
        if self.net.wire is not None:
            return self.net.wire.grid()
        steps = (self.defense.release_spec() or {"steps": []})["steps"]
        if not self.cfg.model.sigmoid and out_grid is None:
            return None
        return wire_quant_params(out_grid, steps, [0.0, 1.0] if self.cfg.model.sigmoid else None)


def build_run(cfg: RunConfig, *, data: SplitData | None = None, float_init: dict | None = None) -> Run:
    """Build data, network (QAT-prepared when ``cfg.quant.scheme == 'int8'``) and defenses.

    ``float_init`` holds float ``{"encoder": sd, "head": sd}`` weights loaded before QAT preparation
    (fine-tuning a float checkpoint with ``--from``).
    """
    torch.manual_seed(cfg.train.seed)
    defense = build_defense(cfg.defense)
    q = cfg.quant.scheme == "int8"
    if defense.requires_qat and not q:
        need = next(d.name for d in defense.defenses if d.requires_qat)
        raise QdefendError(f"defense '{need}' needs a fake-quantized network, but this run is --qat none: "
                           f"train with --qat int8 (e.g. qdefend train --qat int8 --defense {cfg.defense.stack})")
    data = data if data is not None else load_dataset(cfg.data)
    model = build_model(cfg.model, data.shape, data.num_classes)
    if float_init is not None:
        model.encoder.load_state_dict(float_init["encoder"])
        model.head.load_state_dict(float_init["head"])
    z_shape = tuple(feature_shape(model, data.shape))
    encoder, head = model.encoder, model.head
    if q:
        quantizer = quant.make_quantizer(True, act_scales=cfg.quant.act_scales, act_warmup=cfg.quant.act_warmup)
        encoder = quant.prepare_qat(encoder, torch.randn(2, *data.shape), quantizer)
        if cfg.quant.quantize_head:
            head = quant.prepare_qat(head, torch.rand(2, *z_shape), quantizer)
    wire = None
    if cfg.quant.custom_wire:
        wire = quant.WireQuantizer(cfg.quant.wire_bits, cfg.quant.wire_granularity, cfg.quant.wire_order, z_shape[0])
    net = SplitNet(encoder, head, q_encoder=q, q_head=q and cfg.quant.quantize_head, wire=wire)
    return Run(cfg=cfg, data=data, net=net, defense=defense, z_shape=z_shape)


def load_parts(run: Run, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load checkpoint tensors into a built run (strict: a mismatch means another architecture)."""
    try:
        for name, quantized in (("encoder", run.net.q_encoder), ("head", run.net.q_head)):
            part = getattr(run.net, name)
            if quantized:
                quant.load_qat_state_dict(part, parts[name])
            else:
                part.load_state_dict(parts[name])
        mod = run.defense.module()
        if mod is not None and "defense" in parts:
            mod.load_state_dict(parts["defense"])
        wq = run.net.wire  # absent or another granularity: --from a run with another wire (observed anew)
        if wq is not None and "wire" in parts and parts["wire"]["min_val"].shape == wq.min_val.shape:
            wq.load_state_dict(parts["wire"])
    except QdefendError as e:
        raise QdefendError(f"{e} Was config.toml edited after training?") from None
    except (RuntimeError, KeyError) as e:
        raise QdefendError(
            f"checkpoint does not match the run's architecture ({str(e).splitlines()[0]}): "
            "was config.toml edited after training?"
        ) from None


def load_run(root: Path | str, which: str = "best", *, data: SplitData | None = None) -> Run:
    """Rebuild a trained run from its directory and load checkpoint ``which`` (best/latest/epoch-N)."""
    paths = RunPaths(root)
    paths.require_trained()
    cfg = RunConfig.load(paths.config)
    run = build_run(cfg, data=data)
    if which == "best" and not (paths.checkpoints / "best.json").is_file():
        which = "latest"
    parts, _, state = load_checkpoint(paths.checkpoints, which, with_optimizer=False)
    load_parts(run, parts)
    run.net.eval()
    run.paths, run.state = paths, state
    return run


def train_summary(records: list[dict]) -> dict[str, Any]:
    """Test accuracies of the last "test" event and summed epoch time of a run's metrics.jsonl."""
    tests = [r for r in records if r.get("event") == "test"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    test = tests[-1] if tests else {}
    return {"test_acc_int8": test.get("test_acc_int8"), "test_acc_fakequant": test.get("test_acc_fakequant"),
            "epochs": len(epochs),
            "train_time_s": round(sum(float(r.get("time_s", 0.0)) for r in epochs), 2) if epochs else None}
