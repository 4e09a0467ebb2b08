"""Variational bottleneck with a dynamic mask at the cut (``vib-mask``), against input repurposing.

The released features should serve one designated classifier (the run's cloud head) and as little
else as possible. The encoder stays a plain conv net (what is exported), its output z is the mean
mu of a Gaussian posterior q(z|x) = N(mu, diag(sigma^2)), and the device releases

    z~ = mask * (mu + exp(0.5 * logvar) * eps),     eps ~ N(0, I), at training AND inference.

* ``logvar`` is a learned tensor, not an encoder output: input-independent variance is a
  simplification of the paper (whose encoder predicts logvar per input) so that the device applies
  the sampling as a release step with fixed parameters and the exported encoder keeps one output.
  ``granularity="element"`` (default) learns one logvar per element of z (C*H*W values) and masks
  single elements: the finest unit, so the mask can keep the few locations of a channel that
  matter to the head and drop the rest; ``"channel"`` shares one logvar and one mask bit per channel
  (C values: a coarser, cheaper bottleneck). "Dimension" below means one such unit.
* Loss = CE(head(z~), y) (the trainer's task loss) + ``beta`` * KL(q(z|x) || N(0, I)), with
  KL = 0.5 * sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j) SUMMED over all elements of z (masked
  ones too) and averaged over the batch: ``beta`` weighs nats per sample, as in Alemi et al.'s
  deep VIB (beta ~ 1e-3 there). No pixel reconstruction term.
* Dynamic mask: none for the first ``warmup_epochs`` epochs; at the end of epoch
  ``warmup_epochs`` and every ``mask_every`` epochs after it, on the noise-free features mu of the
  first ``saliency_samples`` training images (a uniform sample: splits are in permutation order),
  each dimension j gets
      KL_j  = mean over images of its KL (the information it carries), and
      S_j   = mean over images of |dCE/du_j|, the gradient saliency through the designated head
              (eval mode, its weights untouched) at its input u = mask * mu (what it was trained on,
              so a dropped dimension is scored by how much letting it back in would move the loss);
      score_j = (KL_j / sum_k KL_k) * (S_j / sum_k S_k)
  and the round(``keep_ratio`` * D) highest scores are kept (ties: lower index first), the rest
  zeroed. The product keeps dimensions that carry information AND matter to the designated head;
  information only other models could use (high KL, low saliency) is dropped. The mask is a buffer
  of the defense module (checkpointed with the run). The head needs an epoch with a new mask to
  adapt to it, so the mask is never recomputed at the end of the run's last epoch (a first mask
  still is, when the warm-up fills the run): the defaults (warm-up 1, every 2) compute one mask
  after epoch 1, then after epochs 3, 5, ... that are not the last.
* ``logvar`` trains with its own Adam (``lr``): the trainer's optimizer holds only the network's
  parameters. As in :mod:`.shredder`, the trainer's backward fills its gradient (CE through the
  release, and the KL term) and the step is applied at the next ``release`` of the training run;
  attacks back-propagating through ``release`` never change it.

Release on a device: a step ``{"type": "vib_sample", "log_sigma": [...], "mask": [...]}`` (log_sigma
= logvar / 2; D values each, D = C*H*W for element granularity or C for channel; mask values 0/1),
defined (numpy for the device, its torch twin for training and attacks) in :mod:`qdefend.edge.release`.

Paper: Guo et al., "Variational Feature Compression for Model-Specific Representations"
(arXiv 2604.06644); Alemi et al., "Deep Variational Information Bottleneck", ICLR 2017.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_number
from ..edge.release import unit_view_torch, vib_sample_torch
from ..errors import QdefendError
from .arl import ShapeBuilt
from .base import Defense, EpochContext, OwnOptimizer, StepContext

__all__ = ["VIBMaskConfig", "VIBMask", "GRANULARITIES", "kl_per_dim", "kl_to_prior", "kept_count",
           "select_mask"]

GRANULARITIES = ("element", "channel")
LOGVAR_RANGE = (-20.0, 8.0)  # logvar is clamped here after each step (sigma 4.5e-5 .. 55): no overflow


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 (mu^2 + exp(logvar) - 1 - logvar)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(q(z|x) || N(0, I)) in nats: :func:`kl_per_dim` summed over all but dim 0."""
    return kl_per_dim(mu, logvar).flatten(1).sum(1)


def kept_count(keep_ratio: float, dims: int) -> int:
    """How many dimensions the mask keeps: round(keep_ratio * D), at least 1."""
    return max(1, int(round(keep_ratio * dims)))


def select_mask(kl: torch.Tensor, saliency: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """0/1 mask (the shape of ``kl``) keeping the round(keep_ratio * D) highest
    score_j = (KL_j / sum KL) * (S_j / sum S); ties go to the lower flat index."""
    kl, sal = kl.detach().float(), saliency.detach().float()
    score = (kl / kl.sum().clamp_min(1e-30)) * (sal / sal.sum().clamp_min(1e-30))
    keep = torch.argsort(score.flatten(), descending=True, stable=True)[:kept_count(keep_ratio, score.numel())]
    mask = torch.zeros(score.numel(), device=score.device)
    mask[keep] = 1.0
    return mask.reshape(kl.shape)


class _Bottleneck(ShapeBuilt):
    """logvar (a parameter) and mask (a buffer), one value per dimension unit, built at the first batch."""

    def __init__(self, granularity: str, init_logvar: float):
        super().__init__()
        self.granularity, self.init_logvar = granularity, init_logvar
        self.logvar: nn.Parameter | None = None
        self.register_buffer("mask", None)
        self.register_buffer("mask_updates", torch.zeros((), dtype=torch.int64))  # masks computed so far

    def _build(self, shapes):
        (z_shape,) = shapes
        unit = tuple(z_shape) if self.granularity == "element" else tuple(z_shape[:1])
        self.logvar = nn.Parameter(torch.full(unit, float(self.init_logvar)))
        self.mask = torch.ones(unit)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self._decode(self.shapes.cpu())[0]

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """A per-unit tensor as a view broadcastable over one sample's features."""
        return unit_view_torch(t, self.feature_shape)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Per-element values of one sample's features (C, ...) summed onto the units."""
        return t if self.granularity == "element" else t.reshape(t.shape[0], -1).sum(1)


@dataclass
class VIBMaskConfig:
    beta: float = 1e-3  # weight of KL(q(z|x) || N(0, I)) in nats per sample (summed over dims)
    warmup_epochs: int = 1  # epochs trained without the mask; the first mask is computed after them
    mask_every: int = 2  # recompute the mask every this many epochs after the warm-up (see the docstring)
    keep_ratio: float = 0.5  # fraction of dimensions the mask keeps: round(keep_ratio * D)
    saliency_samples: int = 2048  # training images scored for the mask (0 = the whole train split)
    init_logvar: float = -6.0  # initial logvar (sigma = exp(logvar / 2) = 0.05)
    granularity: str = "element"  # "element": one logvar/mask bit per element of z; "channel": per channel
    lr: float = 1e-2  # Adam learning rate of logvar

    def __post_init__(self):
        p = "defense.params.vib-mask"
        check_number(self.beta, f"{p}.beta", lo=0, example=0.001)
        check_number(self.warmup_epochs, f"{p}.warmup_epochs (the mask needs trained features)", lo=1, integer=True,
                     fix=f"--set {p}.warmup_epochs=1")
        check_number(self.mask_every, f"{p}.mask_every", lo=1, integer=True, example=2)
        check_number(self.keep_ratio, f"{p}.keep_ratio", lo=0, hi=1, lo_open=True, example=0.5)
        check_number(self.saliency_samples, f"{p}.saliency_samples (0 = the whole train split)", lo=0, integer=True,
                     fix=f"--set {p}.saliency_samples=2048")
        check_number(self.init_logvar, f"{p}.init_logvar", lo=LOGVAR_RANGE[0], hi=LOGVAR_RANGE[1], example=-6)
        check_choice(self.granularity, f"{p}.granularity", GRANULARITIES)
        check_number(self.lr, f"{p}.lr", lo=0, lo_open=True, example=0.01)


class VIBMask(OwnOptimizer, Defense):
    """Variational bottleneck (learned variance, sampled on the device) with a dynamic top-k mask."""

    name = "vib-mask"
    Config = VIBMaskConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.bottleneck = _Bottleneck(self.config.granularity, self.config.init_logvar)
        self._pending = False  # loss_terms ran: the trainer's backward will fill logvar's grad
        self._learning = False  # loss_terms ran once: this object is being trained

    @property
    def first_defended_epoch(self) -> int:
        """The first mask is computed at the end of epoch ``warmup_epochs`` (the KL acts from epoch 1)."""
        return self.config.warmup_epochs

    def module(self) -> nn.Module:
        return self.bottleneck

    def _apply_pending(self) -> None:
        if not self._pending:
            return
        self._pending = False
        logvar = self.bottleneck.logvar
        if logvar.grad is None:
            return
        opt = self._adam([logvar], self.config.lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            logvar.clamp_(*LOGVAR_RANGE)

    def _logvar(self, track: bool) -> torch.Tensor:
        lv = self.bottleneck.logvar
        return self.bottleneck.full(lv if track else lv.detach())

    def release(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._apply_pending()
        self.bottleneck.ensure(z.shape[1:], device=z.device)
        track = torch.is_grad_enabled() and (z.requires_grad or self._learning)
        log_sigma = 0.5 * self._logvar(track)
        return vib_sample_torch(z, log_sigma.to(z.dtype), self.bottleneck.full(self.bottleneck.mask).to(z.dtype), generator)

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._pending = self._learning = True
        self.bottleneck.ensure(ctx.z.shape[1:], device=ctx.z.device)
        kl = kl_to_prior(ctx.z.float(), self._logvar(True).float()).mean()
        return {"kl": self.config.beta * kl}

    # -- the dynamic mask --------------------------------------------------------------------
    def mask_due(self, epoch: int, epochs: int = 0) -> bool:
        """Whether the mask is recomputed at the end of 0-based ``epoch`` of a run of ``epochs``
        (0: unknown). The end of the last epoch gets only a first mask, never a new one: the head
        would have no epoch left to adapt to it."""
        done, c = epoch + 1, self.config
        due = done >= c.warmup_epochs and (done - c.warmup_epochs) % c.mask_every == 0
        return due and not (done == epochs and done > c.warmup_epochs)

    def scores(self, z: torch.Tensor, y: torch.Tensor, head: nn.Module, batch_size: int = 512):
        """Per-unit (KL_j, S_j) on noise-free features z (N, ...) with labels y (see the docstring)."""
        b = self.bottleneck
        with torch.no_grad():
            kl = b.reduce(kl_per_dim(z.float(), self._logvar(False).float()).mean(0))
        u_all = (z * b.full(b.mask).to(z.dtype)).detach()
        grad_sum = torch.zeros(z.shape[1:], device=z.device)
        was_training = head.training
        head.eval()
        try:
            with torch.enable_grad():
                for i in range(0, len(z), batch_size):
                    u = u_all[i:i + batch_size].clone().requires_grad_(True)
                    loss = F.cross_entropy(head(u), y[i:i + batch_size], reduction="sum")
                    (g,) = torch.autograd.grad(loss, u)
                    grad_sum += g.abs().sum(0).float()
        finally:
            head.train(was_training)
        return kl, b.reduce(grad_sum / max(1, len(z)))

    def update_mask(self, z: torch.Tensor, y: torch.Tensor, head: nn.Module) -> dict[str, float]:
        """Recompute the mask from features z, labels y and the designated head."""
        b = self.bottleneck
        b.ensure(z.shape[1:], device=z.device)
        kl, sal = self.scores(z, y, head)
        new = select_mask(kl, sal, self.config.keep_ratio).to(b.mask.device)
        changed = float((new != b.mask).sum())
        b.mask = new
        b.mask_updates += 1
        return {"mask_changed": changed, "kl_nats": float(kl.sum())}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        self._apply_pending()
        if not self.bottleneck.built:
            return {}
        out = {}
        if self.mask_due(ctx.epoch, ctx.epochs):
            train = ctx.data.train
            n = self.config.saliency_samples
            split = train if not n or n >= len(train) else type(train)(
                train.images[:n], train.labels[:n], None if train.indices is None else train.indices[:n])
            z, y = ctx.features(split)
            out.update(self.update_mask(z, y, ctx.head))
        b = self.bottleneck
        kept = b.mask > 0
        out["kept"] = float(kept.float().mean())
        out["sigma_mean"] = float((0.5 * b.logvar.detach()).exp()[kept].mean()) if kept.any() else 0.0
        return out

    def release_spec(self):
        b = self.bottleneck
        if not b.built:
            raise QdefendError("vib-mask has no learned variance yet: train the run (qdefend train) before exporting it")
        return {"type": "vib_sample", "log_sigma": (0.5 * b.logvar.detach()).float().cpu().flatten().tolist(),
                "mask": b.mask.detach().float().cpu().flatten().tolist()}
