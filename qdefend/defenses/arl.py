"""ARL: adversarial representation learning against a simulated inversion attacker.

A decoder g (the attacker the cloud could train) is trained alongside the split network, on the
*released* features: each batch it takes ``steps`` Adam steps (lr 1e-3, its own optimizer) to
maximise SSIM(g(z~.detach()), x) on [0,1] pixels. The encoder then pays

    loss += alpha * max(SSIM(g(z~), x) - tau, 0),      tau = 0.5,

through frozen decoder weights, so it only learns to defeat reconstructions better than ``tau``
(a hinge: once the attacker is below tau the task loss alone drives the encoder). For the first
``warmup_epochs`` the decoder trains but the encoder pays nothing (the attacker is pre-trained,
as in ResSFL). With ``noise+arl`` the attacker sees the noisy features (Noise-ARL).

The decoder is :class:`qdefend.decoders.InverseNet` (the black-box attack's
architecture); its layers depend on the feature and image shapes, which a defense first sees at
the first training step, so it is built then (see :class:`ShapeBuilt`) and checkpointed with
the run (``module()``); its Adam state is checkpointed too, so a resumed run keeps the moments.

Paper: Li et al., "ResSFL: A Resistance Transfer Framework for Defending Model Inversion Attack in
Split Federated Learning", CVPR 2022 (attacker-aware training, SSIM hinge); Xia et al., CEM,
CVPR 2025 (arXiv 2503.00383) for the baseline settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number
from ..decoders import InverseNet
from ..errors import QdefendError
from ..image_metrics import ssim01
from .base import Defense, EpochContext, OwnOptimizer, StepContext

__all__ = ["ARLConfig", "ARL", "ShapeBuilt", "ssim_hinge", "pixels01"]


class ShapeBuilt(nn.Module):
    """A defense's trainable part whose layers depend on shapes first seen at a training step.

    Subclasses implement ``_build(shapes)`` (add submodules/parameters). :meth:`ensure` builds on
    first use; the shapes live in the int64 buffer ``shapes`` (saved with the checkpoint), and a
    load-state-dict pre-hook rebuilds the layers from it before their tensors are loaded, so
    ``load_run``/``--resume`` restore a built part into a freshly constructed defense.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shapes", torch.zeros(0, dtype=torch.int64))
        self.register_load_state_dict_pre_hook(ShapeBuilt._rebuild_before_load)

    @property
    def built(self) -> bool:
        return self.shapes.numel() > 0

    @staticmethod
    def _encode(shapes: Sequence[Sequence[int]]) -> torch.Tensor:
        flat = [len(shapes)]
        for s in shapes:
            flat += [len(s), *(int(d) for d in s)]
        return torch.tensor(flat, dtype=torch.int64)

    @staticmethod
    def _decode(t: torch.Tensor) -> list[tuple[int, ...]]:
        v, out, i = t.tolist(), [], 1
        for _ in range(v[0]):
            out.append(tuple(v[i + 1:i + 1 + v[i]]))
            i += 1 + v[i]
        return out

    def _build(self, shapes: list[tuple[int, ...]]) -> None:
        raise NotImplementedError

    def ensure(self, *shapes: Sequence[int], device: torch.device | str | None = None) -> bool:
        """Build for ``shapes`` unless built; True if it was built now. Other shapes: an error."""
        enc = self._encode(shapes)
        if self.built:
            if not torch.equal(self.shapes.cpu(), enc):
                raise QdefendError(
                    f"{type(self).__name__} was built for shapes {self._decode(self.shapes.cpu())}, now sees "
                    f"{[tuple(s) for s in shapes]}: train a new run for another model or dataset"
                )
            return False
        device = self.shapes.device if device is None else device
        self._build([tuple(int(d) for d in s) for s in shapes])
        self.to(device)
        self.shapes = enc.to(device)
        return True

    def _rebuild_before_load(self, state_dict, prefix, *args) -> None:
        saved = state_dict.get(prefix + "shapes")
        if saved is None or saved.numel() == 0 or self.built:
            return
        device = self.shapes.device
        with torch.random.fork_rng(devices=[]):  # the initial values are overwritten by the load
            self._build(self._decode(saved.cpu()))
        self.to(device)
        self.shapes = saved.detach().clone().to(device)


def pixels01(ctx: StepContext) -> torch.Tensor:
    """The step's input batch as [0,1] pixels (undoing the dataset normalisation)."""
    x = ctx.x if ctx.normalization is None else ctx.normalization.invert(ctx.x)
    return x.detach().clamp(0, 1)


def ssim_hinge(recon: torch.Tensor, x01: torch.Tensor, tau: float) -> torch.Tensor:
    """max(SSIM(recon, x01) - tau, 0): zero (and no gradient) while the attacker is below tau."""
    return F.relu(ssim01(recon, x01) - tau)


class _Attacker(ShapeBuilt):
    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.decoder: nn.Module | None = None

    def _build(self, shapes):
        z_shape, x_shape = shapes
        self.decoder = InverseNet(z_shape, x_shape, width=self.width)


@dataclass
class ARLConfig:
    SECTION: ClassVar[str] = "arl"  # where its keys live: defense.params.SECTION (patrol extends it)

    alpha: float = 1.0  # weight of the SSIM hinge in the encoder's loss
    tau: float = 0.5  # SSIM the attacker may reach before the encoder pays (ResSFL: 0.5)
    steps: int = 2  # attacker Adam steps per batch
    lr: float = 1e-3  # attacker learning rate (Adam)
    warmup_epochs: int = 1  # epochs the attacker trains before the encoder is penalised
    width: int = 16  # decoder width (InverseNet)

    def __post_init__(self):
        p = f"defense.params.{self.SECTION}"
        check_number(self.alpha, f"{p}.alpha", lo=0, example=1.0)
        check_number(self.tau, f"{p}.tau", lo=0, hi=1, hi_open=True, example=0.5)
        check_number(self.steps, f"{p}.steps", lo=1, integer=True, example=2)
        check_number(self.lr, f"{p}.lr", lo=0, lo_open=True, example="1e-3")
        check_number(self.warmup_epochs, f"{p}.warmup_epochs", lo=0, integer=True, example=1)
        check_number(self.width, f"{p}.width", lo=1, integer=True, example=16)


class ARL(OwnOptimizer, Defense):
    """Encoder loss alpha * max(SSIM(g(z~), x) - tau, 0) against a decoder g trained alongside."""

    name = "arl"
    Config = ARLConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.attacker = _Attacker(self.config.width)
        self._ssim_sum, self._seen = 0.0, 0

    @property
    def first_defended_epoch(self) -> int:
        """The encoder pays from the epoch after the attacker's ``warmup_epochs``."""
        return self.config.warmup_epochs + 1 if self.config.alpha > 0 else 1

    def module(self) -> nn.Module:
        return self.attacker

    def train_attacker(self, z_released: torch.Tensor, x01: torch.Tensor) -> torch.Tensor:
        """``steps`` Adam steps of the decoder on detached features; the last step's SSIM."""
        att = self.attacker
        att.ensure(z_released.shape[1:], x01.shape[1:], device=z_released.device)
        opt = self._adam(att.decoder.parameters(), self.config.lr)
        zd, xd = z_released.detach(), x01.detach()
        att.train()
        with torch.enable_grad():
            for _ in range(self.config.steps):
                s = ssim01(att.decoder(zd), xd)
                opt.zero_grad(set_to_none=True)
                (1 - s).backward()
                opt.step()
        return s.detach()

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        x01 = pixels01(ctx)
        s = self.train_attacker(ctx.z_released, x01)
        self._ssim_sum += float(s) * len(x01)
        self._seen += len(x01)
        if ctx.epoch < self.config.warmup_epochs or self.config.alpha == 0:
            return {"ssim_hinge": torch.zeros((), device=ctx.z.device)}
        dec = self.attacker.decoder
        dec.requires_grad_(False)  # the encoder's term moves the encoder only
        try:
            hinge = ssim_hinge(dec(ctx.z_released), x01, self.config.tau)
        finally:
            dec.requires_grad_(True)
        return {"ssim_hinge": self.config.alpha * hinge}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        if not self._seen:
            return {}
        out = {"attacker_ssim": self._ssim_sum / self._seen}
        self._ssim_sum, self._seen = 0.0, 0
        return out
