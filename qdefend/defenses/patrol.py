"""PATROL as the CEM code approximates it: Taylor-importance channel pruning of the edge encoder
late in training, on top of ARL's attacker-aware training.

PATROL (Ding et al., "PATROL: Privacy-Oriented Pruning for Collaborative Inference Against Model
Inversion Attacks", WACV 2024) prunes the edge model so that more layers fit on the device, with
Lipschitz regularisation and adversarial reconstruction training; its repository has no code. The
CEM code (Xia et al., CVPR 2025) stands in for it with first-order Taylor channel pruning (ratio
0.05) late in training, combined with ARL. This defense does that:

* everything :mod:`.arl` does (a decoder attacker trained alongside; the encoder pays
  ``alpha * max(SSIM - tau, 0)``);
* at the end of epoch ``prune_epoch`` it scores every prunable channel of the encoder (each conv
  followed by a BatchNorm: VGG's ``stageK.0``/``stageK.1``, ResNet's ``convN``/``bnN``, MobileNet's
  depthwise and pointwise convs) by the squared first-order Taylor estimate of the task loss change
  when the channel is removed, ``(sum over the filter of w * dL/dw)^2``, averaged over
  ``taylor_batches`` training batches (Molchanov et al., "Importance Estimation for Neural Network
  Pruning", CVPR 2019), normalised by each layer's mean, and prunes the lowest ``ratio`` of all of
  them (at least one channel stays in each layer). The bottleneck conv at the cut is never pruned:
  the wire keeps its shape;
* a pruned channel is its conv filter, its BatchNorm shift and running mean set to zero, so its
  output is exactly 0 in training (batch statistics), evaluation, and the int8 export (the folded
  weights and bias are 0). The masks are checkpointed with the run and re-applied before every
  encoder forward for the rest of training, so momentum cannot revive a pruned channel.

The best checkpoint is picked from the pruned epochs on (``first_defended_epoch``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from ..data import batches
from .arl import ARL, ARLConfig
from .base import EpochContext, StepContext

__all__ = ["PatrolConfig", "Patrol", "prunable_units", "taylor_importance", "select_pruned"]


@dataclass
class PatrolConfig(ARLConfig):
    SECTION: ClassVar[str] = "patrol"

    ratio: float = 0.05  # share of the encoder's prunable channels removed (the CEM code's 0.05)
    prune_epoch: int = 1  # 1-based epoch at whose end it prunes (late in training: raise it for long runs)
    taylor_batches: int = 8  # training batches the Taylor importance is averaged over
    taylor_batch_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        p = "defense.params.patrol"
        check_number(self.ratio, f"{p}.ratio", lo=0, hi=1, hi_open=True, example=0.05)
        check_number(self.prune_epoch, f"{p}.prune_epoch", lo=1, integer=True, example=1)
        check_number(self.taylor_batches, f"{p}.taylor_batches", lo=1, integer=True, example=8)
        check_number(self.taylor_batch_size, f"{p}.taylor_batch_size", lo=1, integer=True, example=128)


@dataclass(frozen=True)
class Unit:
    """One prunable layer: a conv weight and the BatchNorm that follows it."""

    conv: str  # the conv's weight parameter, e.g. "stage2.0.weight"
    bn: str  # the BatchNorm's prefix, e.g. "stage2.1"
    channels: int


def _bn_after(conv_prefix: str) -> str:
    """The BatchNorm module that follows a conv, by the models' naming: ``X.k`` -> ``X.(k+1)``
    (Sequential conv-BN-ReLU) and ``X.convN`` -> ``X.bnN`` (ResNet blocks)."""
    m = re.fullmatch(r"(.*\.)?(\d+)", conv_prefix)
    if m:
        return f"{m.group(1) or ''}{int(m.group(2)) + 1}"
    m = re.fullmatch(r"(.*\.)?conv(\d*)", conv_prefix)
    return f"{m.group(1) or ''}bn{m.group(2)}" if m else ""


def prunable_units(encoder: nn.Module) -> list[Unit]:
    """The encoder's conv -> BatchNorm pairs, in parameter order (works on the float module and on
    its pt2e QAT graph, which keep the same names)."""
    params, bufs = dict(encoder.named_parameters()), dict(encoder.named_buffers())
    units = []
    for name, p in params.items():
        if p.dim() != 4 or not name.endswith(".weight"):
            continue
        bn = _bn_after(name[: -len(".weight")])
        rm = bufs.get(f"{bn}.running_mean")
        if bn and rm is not None and f"{bn}.bias" in params and rm.numel() == p.shape[0]:
            units.append(Unit(name, bn, int(p.shape[0])))
    return units


def taylor_importance(encoder: nn.Module, head: nn.Module, data, units: list[Unit], *, n_batches: int,
                      batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Per unit, per output channel: the mean over ``n_batches`` training batches of
    ``(sum over the filter of w * dL/dw)^2`` with L the task cross-entropy (no release transform)."""
    params = dict(encoder.named_parameters())
    weights = [params[u.conv] for u in units]
    device = weights[0].device
    acc = [torch.zeros(u.channels, dtype=torch.float64, device=device) for u in units]
    n = 0
    with torch.enable_grad():
        for xb, yb in itertools.islice(batches(data.train, batch_size, shuffle=True, seed=seed, epoch=0), n_batches):
            x = torch.from_numpy(data.normalization.apply(xb)).to(device)
            loss = F.cross_entropy(head(encoder(x)), torch.from_numpy(yb).to(device))
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for a, w, g in zip(acc, weights, grads):
                if g is not None:
                    a += (w.detach() * g).double().flatten(1).sum(1).pow(2)
            n += 1
    return [a / max(n, 1) for a in acc]


def select_pruned(importance: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Keep masks (True = kept): the lowest ``ratio`` of all channels by layer-normalised importance,
    at least one channel kept per layer."""
    normed = [imp / imp.mean().clamp_min(1e-30) for imp in importance]
    flat = torch.cat(normed)
    k = int(ratio * flat.numel())
    keep = [torch.ones(len(imp), dtype=torch.bool, device=imp.device) for imp in importance]
    if k == 0:
        return keep
    owners = torch.cat([torch.full((len(imp),), i) for i, imp in enumerate(importance)])
    offsets = list(itertools.accumulate([0] + [len(imp) for imp in importance]))
    pruned = 0
    for idx in torch.argsort(flat, stable=True).tolist():
        if pruned == k:
            break
        i = int(owners[idx])
        j = idx - offsets[i]
        if int(keep[i].sum()) > 1:
            keep[i][j] = False
            pruned += 1
    return keep


class _Masks(nn.Module):
    """The kept channels of every unit, one flat uint8 buffer (empty until pruning), checkpointed;
    a load resizes it first."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keep", torch.zeros(0, dtype=torch.uint8))
        self.register_load_state_dict_pre_hook(_Masks._resize)

    @staticmethod
    def _resize(self, state_dict, prefix, *args) -> None:  # a pre-hook gets the module first
        saved = state_dict.get(prefix + "keep")
        if saved is not None and saved.shape != self.keep.shape:
            self.keep = torch.zeros_like(saved, device=self.keep.device)

    @property
    def pruned(self) -> bool:
        return self.keep.numel() > 0


class Patrol(ARL):
    """ARL plus Taylor channel pruning of the encoder at the end of ``prune_epoch``."""

    name = "patrol"
    Config = PatrolConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.masks = _Masks()
        self._parts = nn.ModuleDict({"attacker": self.attacker, "pruning": self.masks})
        self._hooked: set[int] = set()

    @property
    def first_defended_epoch(self) -> int:
        return max(super().first_defended_epoch, self.config.prune_epoch)

    def module(self) -> nn.Module:
        return self._parts

    # -- the masks -----------------------------------------------------------------------------
    def keep_masks(self, encoder: nn.Module) -> list[tuple[Unit, torch.Tensor]]:
        units = prunable_units(encoder)
        if sum(u.channels for u in units) != self.masks.keep.numel():
            from ..errors import QdefendError

            raise QdefendError(f"patrol's pruning masks hold {self.masks.keep.numel()} channels but this encoder has "
                               f"{sum(u.channels for u in units)} prunable ones: train a new run for another model")
        out, i = [], 0
        for u in units:
            out.append((u, self.masks.keep[i:i + u.channels].bool()))
            i += u.channels
        return out

    @torch.no_grad()
    def apply(self, encoder: nn.Module) -> None:
        """Zero every pruned channel's filter, BatchNorm shift and running mean."""
        if not self.masks.pruned:
            return
        params, bufs = dict(encoder.named_parameters()), dict(encoder.named_buffers())
        for u, keep in self.keep_masks(encoder):
            drop = ~keep.to(params[u.conv].device)
            params[u.conv][drop] = 0
            params[f"{u.bn}.bias"][drop] = 0
            bufs[f"{u.bn}.running_mean"][drop] = 0

    def _hook(self, encoder: nn.Module) -> None:
        """Re-apply the masks before every forward of ``encoder`` (once per encoder object)."""
        if self.masks.pruned and id(encoder) not in self._hooked:
            encoder.register_forward_pre_hook(lambda m, args: self.apply(m))
            self._hooked.add(id(encoder))

    # -- the defense ---------------------------------------------------------------------------
    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._hook(ctx.encoder)  # a resumed run: the masks came with the checkpoint
        return super().loss_terms(ctx)

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        out = super().on_epoch_end(ctx)
        c = self.config
        if ctx.epoch + 1 == c.prune_epoch and not self.masks.pruned:
            units = prunable_units(ctx.encoder)
            if units:
                imp = taylor_importance(ctx.encoder, ctx.head, ctx.data, units, n_batches=c.taylor_batches,
                                        batch_size=c.taylor_batch_size, seed=ctx.epoch)
                keep = torch.cat(select_pruned(imp, c.ratio)).to(torch.uint8)
                self.masks.keep = keep.to(self.masks.keep.device)
        self.apply(ctx.encoder)  # the checkpoint written next holds exactly zero channels
        self._hook(ctx.encoder)
        if self.masks.pruned:
            out["pruned_channels"] = float((self.masks.keep == 0).sum())
            out["prunable_channels"] = float(self.masks.keep.numel())
        return out
