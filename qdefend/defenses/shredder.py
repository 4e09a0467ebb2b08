"""Shredder: learned additive noise at the cut (the paper learns it with the network frozen).

Shredder casts the noise as trainable parameters: a bank of K noise tensors n_1..n_K of the
feature shape, initialised from Laplace(0, init_scale). Each released sample gets one tensor of
the bank, drawn uniformly (z~ = z + n_k, at training and inference: sampling from the learned
noise distribution), and the bank is trained to keep the task loss low while growing the noise:

    loss += -alpha * mean |n|        (|n| clamped to max_abs after every step)

so alpha is the privacy/accuracy knob. The bank has its own Adam (``lr``), because the trainer's
optimizer only holds the network's parameters: the trainer's backward fills the bank's gradient
(task loss and every loss term, this one included) and the Shredder applies it in its next
``release`` of the same run (or at the epoch end). Steps only happen after ``loss_terms`` was
called, i.e. only inside ``qdefend train``; an attack that back-propagates through ``release``
never changes the bank.

The paper trains the noise with the network frozen: start from a trained run and freeze it,
``qdefend train --from runs/base --defense shredder --set train.freeze=network`` (weights, BatchNorm
running statistics and quantization ranges stay fixed; only the bank learns). A plain
``--defense shredder`` run trains network and noise together.

Release on a device: a step ``{"type": "additive_noise", "tensors": [[...], ...]}`` (K flattened
tensors; each sample adds one drawn uniformly), defined with its torch twin in
:mod:`qdefend.edge.release`.

Paper: Mireshghallah et al., "Shredder: Learning Noise Distributions to Protect Inference
Privacy", ASPLOS 2020 (arXiv 1905.11814).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_number
from ..edge.release import additive_noise_torch
from ..errors import QdefendError
from .arl import ShapeBuilt
from .base import Defense, EpochContext, OwnOptimizer, StepContext

__all__ = ["ShredderConfig", "Shredder"]


class _NoiseBank(ShapeBuilt):
    def __init__(self, n_tensors: int, init_scale: float):
        super().__init__()
        self.n_tensors, self.init_scale = n_tensors, init_scale
        self.noise: nn.Parameter | None = None

    def _build(self, shapes):
        (z_shape,) = shapes
        e = torch.empty((2, self.n_tensors, *z_shape)).exponential_()
        self.noise = nn.Parameter(self.init_scale * (e[0] - e[1]))


@dataclass
class ShredderConfig:
    alpha: float = 0.1  # weight of the noise-magnitude reward -mean|n|
    n_tensors: int = 8  # K noise tensors in the bank; one drawn per sample
    init_scale: float = 0.1  # Laplace scale of the initial noise
    lr: float = 1e-2  # Adam learning rate of the noise
    max_abs: float = 4.0  # |n| is clamped to this after every step

    def __post_init__(self):
        p = "defense.params.shredder"
        check_number(self.alpha, f"{p}.alpha", lo=0, example=0.1)
        check_number(self.n_tensors, f"{p}.n_tensors", lo=1, integer=True, example=8)
        check_number(self.init_scale, f"{p}.init_scale", lo=0, example=0.1)
        check_number(self.lr, f"{p}.lr", lo=0, lo_open=True, example=0.01)
        check_number(self.max_abs, f"{p}.max_abs", lo=0, lo_open=True, example=4)


class Shredder(OwnOptimizer, Defense):
    """Learned additive noise tensors at the cut (one of K per sample), trained for accuracy and size."""

    name = "shredder"
    Config = ShredderConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.bank = _NoiseBank(self.config.n_tensors, self.config.init_scale)
        self._pending = False  # loss_terms ran: the trainer's backward will fill the bank's grad
        self._learning = False  # loss_terms ran once: this object is being trained

    def module(self) -> nn.Module:
        return self.bank

    def _apply_pending(self) -> None:
        if not self._pending:
            return
        self._pending = False
        noise = self.bank.noise
        if noise.grad is None:
            return
        opt = self._adam([noise], self.config.lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            noise.clamp_(-self.config.max_abs, self.config.max_abs)

    def release(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._apply_pending()
        self.bank.ensure(z.shape[1:], device=z.device)
        noise = self.bank.noise
        if not (torch.is_grad_enabled() and (z.requires_grad or self._learning)):
            noise = noise.detach()  # plain inference (export, evaluation): no graph through the bank
        return additive_noise_torch(z, noise, generator)

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._pending = self._learning = True
        return {"magnitude": -self.config.alpha * self.bank.noise.abs().mean()}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        self._apply_pending()
        if not self.bank.built:
            return {}
        return {"noise_abs_mean": float(self.bank.noise.detach().abs().mean())}

    def release_spec(self):
        if not self.bank.built:
            raise QdefendError("shredder has no learned noise yet: train the run (qdefend train) before exporting it")
        flat = self.bank.noise.detach().float().cpu().reshape(self.config.n_tensors, -1)
        return {"type": "additive_noise", "tensors": flat.tolist()}
