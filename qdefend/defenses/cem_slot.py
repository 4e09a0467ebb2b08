"""CEM with a learned surrogate: Slot Attention + gated cross-attention instead of k-means / GMM.

``cem`` pushes the spread of each class's mixture components under the noise floor tau * sigma^2,
with components found by k-means after every epoch. ``cem-slot`` learns the components instead
(Slot Attention, Locatello et al., NeurIPS 2020, with Flamingo's tanh-gated cross-attention,
Alayrac et al., NeurIPS 2022, as CEM's surrogate):

1. The batch's noise-free features x_n = flatten(z_n) (D dims) are projected, LayerNorm first, to
   h_n = W LN(x_n) (``dim`` dims). Per class, Slot Attention groups them into K slots: slots drawn
   from a learned Gaussian (a mean per slot, a shared diagonal sigma), ``iters`` rounds of attention with the softmax over SLOTS (each point is
   shared out among the slots of its class), weighted-mean updates, a GRU and an MLP residual,
   LayerNorm on inputs and slots. The grouping is per class, like cem's per-class k-means: a class's
   points compete only for that class's slots, so every class gets its own K components; the
   slot-initialisation Gaussian and the weights are shared by all classes. Two choices make the
   untrained module a soft k-means that settles within ~100 Adam steps: the query/key/value maps
   start at the identity (random ones left the slots stuck in merged local minima on toy clusters,
   tests/test_defense_cem_slot.py), and the initial sigma is small (SIGMA_INIT: the slot identities
   stay stable from batch to batch; one mean shared by all slots would leave them identical).
2. A tanh-gated cross-attention block (Flamingo) reconstructs each feature from its class's slots:
   r_n = h_n + tanh(gate) * attn(h_n -> slots), gate a learned scalar from ``gate_init``. The soft
   assignment a_nk is the attention of the reconstruction r_n over the slots (softmax over slots).
   At gate 0 it is the feature's own attention; opening the gate lets the slot context sharpen it.
3. Slot statistics in the ORIGINAL feature space, so they compare with the noise floor: mass
   m_ck = sum a_nk, mean mu_ck = sum a_nk x_n / m_ck, dispersion v_ck = sum a_nk |x_n - mu_ck|^2 /
   (D m_ck). (A reconstruction through a decoder of r_n would include the feature's own residual
   path, so its error could be driven to zero by closing the gate: a surrogate that measures nothing.)
4. The same log hinge as cem with w_ck = m_ck / N_c (the slot's mass share) and v_ck clipped to
   [0, var_clip]:  L = mean over classes of sum_k w_ck relu(log(v_ck + g) - log(tau sigma^2 + g)).

Training. The slot module has its own objective and its own Adam (``lr``, ``steps`` per batch, on
detached features): it minimises the mass-weighted dispersion sum_k w_ck v_ck, the soft k-means
objective, so it fits the mixture as tightly as the batch allows (the minimum is k-means' partition,
not zero: with K slots per class it cannot fit every point unless the features do cluster). The
encoder then gets lambda * L through the updated module with its parameters frozen; by default the
assignments are held fixed (``attn_grad=false``), as cem's nearest-centroid assignment is, so the
gradient pulls each feature toward its slots' means and the encoder cannot lower the term by
steering the attention; ``attn_grad=true`` differentiates through the frozen attention too.
The optimisation order (encoder-only gradient, kept and added after the task backward), the noise
floor read from the stack's ``noise`` and the lambda schedule are cem's own (``bind_stack``,
``floor``, ``lambda_at`` of an inner :class:`~qdefend.defenses.cem.CEM`). There is no rho mixing
with epoch statistics: the slot module's parameters are the memory across batches. The slot module
trains from the first step, so it is fitted when the term starts at ``start_epoch``.

Strength. cem mixes each batch variance with its epoch statistic, v = rho * vhat + (1 - rho) * vbar,
and rho = 10 n_batch_ck / n_ck is about 0.06 at batch 128 on 20,000 images, so its encoder gradient
is damped ~15x; cem-slot's dispersion is the batch's own. At the same lambda cem-slot therefore
acts much harder (Fashion-MNIST, 3 epochs: lambda 16 drives the dispersion onto the floor and costs
~8 accuracy points; lambda 1 is about cem's lambda 16 in accuracy): compare the two at equal
accuracy, not at equal lambda (``benchmarks/defenses_ii.py --study cem``).

It releases nothing (stack it after noise: ``--defense noise+cem-slot``) and adds nothing to the
exported encoder; the slot module and its Adam state are checkpointed with the run.

Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383); Locatello et al.,
"Object-Centric Learning with Slot Attention", NeurIPS 2020 (arXiv 2006.15055); Alayrac et al.,
"Flamingo: a Visual Language Model for Few-Shot Learning", NeurIPS 2022 (tanh-gated cross-attention).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_number, require
from ..errors import QdefendError
from .arl import ShapeBuilt
from .base import Defense, EpochContext, OwnOptimizer, StepContext
from .cem import CEM, CEMConfig, log_hinge

__all__ = ["CEMSlot", "CEMSlotConfig", "SlotSurrogate", "slot_dispersion", "slot_hinge"]

NAME = "cem-slot"
SIGMA_INIT = 0.1  # initial sigma of the slot Gaussian (0.01: merges kept; 0.3: fits lost again)
_P = f"--set defense.params.{NAME}."
# CEMConfig fields cem-slot shares (validated by CEMConfig, used by the inner CEM)
SHARED = ("lam", "sigma", "tau", "log_offset", "schedule", "lr_ref", "lr_floor", "start_epoch", "ramp_epochs")


def _slot_msg(msg: str) -> str:
    """A cem error message, retold for cem-slot (its name, its --set keys, its stack)."""
    msg = msg.replace("defense.params.cem.", f"defense.params.{NAME}.").replace("noise+cem ", f"noise+{NAME} ")
    return f"{NAME} {msg[4:]}" if msg.startswith("cem ") else msg


@contextlib.contextmanager
def _as_cem_slot() -> Iterator[None]:
    try:
        yield
    except QdefendError as e:
        raise QdefendError(_slot_msg(str(e))) from None


@dataclass
class CEMSlotConfig:
    # shared with cem (same meaning, same defaults)
    lam: float = 16.0  # lambda (paper: 0, 8, 16); 0 turns the encoder term off
    sigma: float = 0.0  # noise floor sigma; 0 = read it from the noise defense of the stack
    tau: float = 0.125  # floor = tau * sigma^2
    log_offset: float = 0.01  # g in log(v + g)
    schedule: str = "lr"  # lr: lambda * lr_ref / lr while lr >= lr_floor (the CEM code) | constant
    lr_ref: float = 0.001
    lr_floor: float = 4.1e-4
    start_epoch: int = 2  # 1-based; the slot module trains from the first step
    ramp_epochs: int = 0
    # the slot surrogate
    slots: int = 5  # K, slots (mixture components) per class
    dim: int = 32  # d, projected feature and slot size
    iters: int = 3  # Slot Attention rounds
    temperature: float = 1.0  # divides every attention logit (slot and cross attention)
    gate_init: float = 0.0  # initial gate of the cross-attention (tanh(0) = 0: Flamingo's start)
    var_clip: float = 1.0  # dispersion clamped to [0, var_clip] before the log (sigmoid z: <= 0.25)
    lr: float = 1e-3  # Adam learning rate of the slot module
    steps: int = 1  # slot-module Adam steps per batch
    attn_grad: bool = False  # true: the encoder's gradient also flows through the (frozen) attention

    def __post_init__(self):
        with _as_cem_slot():
            self.cem_config()  # the shared fields, checked by cem's own rules
        p = f"defense.params.{NAME}"
        for name, lo in (("slots", 1), ("dim", 1), ("iters", 1), ("steps", 1)):
            setattr(self, name, check_number(getattr(self, name), f"{p}.{name}", lo=lo, integer=True,
                                             example=_default(name)))
        for name in ("temperature", "var_clip", "lr"):
            check_number(getattr(self, name), f"{p}.{name}", lo=0, lo_open=True, example=_default(name))
        check_number(self.gate_init, f"{p}.gate_init", example=0.0)
        require(isinstance(self.attn_grad, bool),
                f"{p}.attn_grad must be true or false, got {self.attn_grad!r}: e.g. --set {p}.attn_grad=false")

    def cem_config(self) -> CEMConfig:
        return CEMConfig(**{k: getattr(self, k) for k in SHARED})


def _default(name: str):
    return next(f.default for f in fields(CEMSlotConfig) if f.name == name)


# -- statistics in the original feature space ------------------------------------------------------

def slot_dispersion(x: torch.Tensor, a: torch.Tensor, group: torch.Tensor, groups: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass m (G x K) and dispersion v (G x K) of features x (N x D) under soft assignments a (N x K).

    ``group`` (N) says which of the ``groups`` classes each point belongs to; within a class,
    mu_k = sum a_nk x_n / m_k and v_k = sum a_nk |x_n - mu_k|^2 / (D m_k). Differentiable in x and a.
    """
    D = x.shape[1]
    onehot = F.one_hot(group, groups).to(x.dtype)  # N x G
    wa = onehot.T[:, :, None] * a[None]  # G x N x K: the class's points only
    mass = wa.sum(1)
    safe = mass.clamp(min=1e-12)
    mu = torch.einsum("gnk,nd->gkd", wa, x) / safe[..., None]
    sq = (x[:, None, :] - mu[group]).square().sum(-1)  # N x K, exact (no |x|^2 - |mu|^2 cancellation)
    return mass, torch.einsum("gnk,nk->gk", wa, sq) / (D * safe)


def slot_hinge(mass: torch.Tensor, v: torch.Tensor, floor: float, g: float, var_clip: float) -> torch.Tensor:
    """cem's log hinge on slot statistics: mean over classes of sum_k w_k relu(log(v_k + g) -
    log(floor + g)), w_k = m_k / sum_k m_k, v_k clamped to [0, var_clip]."""
    w = mass / mass.sum(1, keepdim=True).clamp(min=1e-12)
    return (w * log_hinge(v.clamp(0, var_clip), floor, g)).sum(1).mean()


def _groups(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    classes, group = torch.unique(y, return_inverse=True)
    return group, len(classes)


# -- the slot module -------------------------------------------------------------------------------

class SlotSurrogate(ShapeBuilt):
    """Projection + per-class Slot Attention + tanh-gated cross-attention; built for the feature
    size D at the first step (:class:`~qdefend.defenses.arl.ShapeBuilt`)."""

    def __init__(self, slots: int, dim: int, iters: int, temperature: float, gate_init: float):
        super().__init__()
        self.k, self.d, self.iters, self.temperature, self.gate_init = slots, dim, iters, temperature, gate_init

    def _build(self, shapes):
        (D,), d = shapes[0], self.d
        self.proj = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, d))
        # Slot Attention (Locatello et al. 2020, Alg. 1)
        self.slot_mu = nn.Parameter(torch.randn(1, self.k, d) * d ** -0.5)  # per slot: no symmetric start
        self.slot_logsigma = nn.Parameter(torch.full((1, 1, d), math.log(SIGMA_INIT)))
        self.norm_in, self.norm_slots, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.kk, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.gru = nn.GRUCell(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        # gated cross-attention, features -> slots (Flamingo)
        self.norm_x, self.norm_s = nn.LayerNorm(d), nn.LayerNorm(d)
        self.xq, self.xk, self.xv, self.xo = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate = nn.Parameter(torch.tensor(float(self.gate_init)))
        for lin in (self.q, self.kk, self.v, self.xq, self.xk, self.xv):
            nn.init.eye_(lin.weight)  # start as soft k-means in the projected space (module docstring)

    def _logits(self, q: torch.Tensor, k: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """q (N x d) against the slots of each point's class, k (G x K x d): N x K, scaled."""
        return torch.einsum("nd,nkd->nk", q, k[group]) / (math.sqrt(self.d) * self.temperature)

    def slot_attention(self, h: torch.Tensor, group: torch.Tensor, groups: int,
                       eps: torch.Tensor | None = None) -> torch.Tensor:
        """K slots per class (G x K x d) from projected features h; ``eps`` (G x K x d) draws the
        initial slots (None: the mean of the learned Gaussian)."""
        inputs = self.norm_in(h)
        k, v = self.kk(inputs), self.v(inputs)
        slots = self.slot_mu.expand(groups, self.k, self.d)
        if eps is not None:
            slots = slots + self.slot_logsigma.exp() * eps
        onehot = F.one_hot(group, groups).to(h.dtype).T  # G x N
        for _ in range(self.iters):
            prev = slots
            attn = torch.softmax(self._logits(k, self.q(self.norm_slots(slots)), group), dim=1) + 1e-8
            wa = onehot[:, :, None] * attn[None]  # G x N x K
            updates = torch.einsum("gnk,nd->gkd", wa, v) / wa.sum(1)[..., None]  # weighted mean
            slots = self.gru(updates.reshape(-1, self.d), prev.reshape(-1, self.d)).view(groups, self.k, self.d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots

    def assign(self, x: torch.Tensor, group: torch.Tensor, groups: int,
               eps: torch.Tensor | None = None) -> torch.Tensor:
        """Soft assignments a (N x K, rows sum to 1) of flattened features x to their class's slots."""
        h = self.proj(x)
        slots = self.slot_attention(h, group, groups, eps)
        sn = self.norm_s(slots)
        ks, vs = self.xk(sn), self.xv(sn)
        attn = torch.softmax(self._logits(self.xq(self.norm_x(h)), ks, group), dim=1)
        r = h + torch.tanh(self.gate) * self.xo(torch.einsum("nk,nkd->nd", attn, vs[group]))
        return torch.softmax(self._logits(self.xq(self.norm_x(r)), ks, group), dim=1)


@contextlib.contextmanager
def _frozen(m: nn.Module) -> Iterator[None]:
    m.requires_grad_(False)
    try:
        yield
    finally:
        m.requires_grad_(True)


# -- the defense ---------------------------------------------------------------------------------

class CEMSlot(OwnOptimizer, Defense):
    """CEM whose mixture components are learned slots (Slot Attention + gated cross-attention)."""

    name = NAME
    Config = CEMSlotConfig

    def __init__(self, config: CEMSlotConfig | None = None):
        super().__init__(config)
        c = self.config
        self.cem = CEM(c.cem_config())  # noise floor, sigma from the stack, lambda schedule
        self.slots = SlotSurrogate(c.slots, c.dim, c.iters, c.temperature, c.gate_init)
        self._sums = {"dispersion": 0.0, "hinge": 0.0, "steps": 0}

    @property
    def first_defended_epoch(self) -> int:
        """The term acts from ``start_epoch``, or the first epoch of a fine-tune (the slot module trains
        before, the encoder does not pay)."""
        return self.cem.first_defended_epoch

    # -- what cem provides, told as cem-slot ---------------------------------------------------
    def bind_stack(self, defenses: list[Defense]) -> None:
        with _as_cem_slot():
            self.cem.bind_stack([d for d in defenses if d is not self])

    @property
    def sigma(self) -> float:
        with _as_cem_slot():
            return self.cem.sigma

    @property
    def floor(self) -> float:
        with _as_cem_slot():
            return self.cem.floor

    def lambda_at(self, epoch: int, lr: float | None) -> float:
        with _as_cem_slot():
            return self.cem.lambda_at(epoch, lr)

    # -- the surrogate ---------------------------------------------------------------------------
    def _draw(self, groups: int, device) -> torch.Tensor:
        return torch.randn(groups, self.config.slots, self.config.dim, device=device)

    def fit_step(self, z: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None) -> float:
        """``steps`` Adam steps of the slot module on detached features, minimising the mass-weighted
        dispersion (soft k-means); returns the last objective value."""
        x = z.detach().reshape(len(z), -1).float()
        mod = self.slots
        mod.ensure((x.shape[1],), device=x.device)
        opt = self._adam(mod.parameters(), self.config.lr)
        group, G = _groups(y)
        with torch.enable_grad():
            for _ in range(self.config.steps):
                mass, v = slot_dispersion(x, mod.assign(x, group, G, eps), group, G)
                obj = (mass / mass.sum(1, keepdim=True) * v).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                obj.backward()
                opt.step()
        opt.zero_grad(set_to_none=True)  # the slot module holds no gradient outside its own step
        return float(obj.detach())

    def statistics(self, z: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot mass and dispersion (G x K, classes of ``y`` in sorted order) under the current,
        frozen slot module; differentiable in z (through the assignments too if ``attn_grad``)."""
        x = z.reshape(len(z), -1).float()
        group, G = _groups(y)
        with _frozen(self.slots):
            if self.config.attn_grad:
                a = self.slots.assign(x, group, G, eps)
            else:
                with torch.no_grad():
                    a = self.slots.assign(x.detach(), group, G, eps)
        return slot_dispersion(x, a, group, G)

    def hinge(self, z: torch.Tensor, y: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor | None:
        """L of a batch (differentiable in z); None before the slot module is built."""
        if not self.slots.built:
            return None
        mass, v = self.statistics(z, y, eps)
        c = self.config
        return slot_hinge(mass, v, self.floor, c.log_offset, c.var_clip)

    # -- Defense hooks -------------------------------------------------------------------------
    def encoder_loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        lam = self.lambda_at(ctx.epoch, getattr(ctx, "lr", None))
        if self.config.lam > 0:
            self.floor  # no noise sigma: fail at the first step, not when the term starts
        eps = self._draw(len(torch.unique(ctx.y)), ctx.z.device)  # the same slot draw for both passes
        disp = self.fit_step(ctx.z, ctx.y, eps)
        try:
            floor_known = self.floor > 0
        except QdefendError:  # lambda 0 without noise: no floor, no hinge diagnostic
            floor_known = False
        h = None
        if floor_known:
            with contextlib.nullcontext() if lam else torch.no_grad():
                h = self.hinge(ctx.z, ctx.y, eps)
        self._sums["dispersion"] += disp
        self._sums["hinge"] += 0.0 if h is None else float(h.detach())
        self._sums["steps"] += 1
        return {"loss": lam * h} if lam and h is not None else {}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Epoch means of the slot dispersion and the hinge over the training batches, and the gate."""
        s, out = self._sums, {}
        if s["steps"]:
            out = {"dispersion": s["dispersion"] / s["steps"], "hinge": s["hinge"] / s["steps"]}
        if self.slots.built:
            out["gate"] = float(torch.tanh(self.slots.gate.detach()))
        self._sums = {"dispersion": 0.0, "hinge": 0.0, "steps": 0}
        return out

    def module(self) -> nn.Module:
        return self.slots
