"""DivQAT: an extraction defense folded into quantization-aware training.

Besides the task cross-entropy of the quantized (fake-quant) network, a temperature-scaled KL term
pushes the quantized network's output distribution away from its full-precision twin's:

    L = CE(q, y) - weight * T^2 * mean_i  m_i * min(KL_i, max_kl)
    KL_i = KL( softmax(fp_i / T) || softmax(q_i / T) ),   fp detached
    m_i  = 1 if argmax q_i == y_i else 0                    (only_correct; 1 for every sample otherwise)

so the soft answers the deployed int8 service gives differ from what the float weights compute,
while the top-1 decision stays the label's.

The full-precision reference (``reference``).
* ``twin`` (the default): the *same* network, in the same step, with fake quantization switched off
  (torchao pt2e ``disable_fake_quant`` / ``disable_observer`` on every fake-quant module of the
  prepared graph), one extra forward without autograd; afterwards every buffer (fake-quant and
  observer switches, BatchNorm running statistics, which the twin's train-mode forward would
  update) is put back. Under ``--qat int8`` only the edge encoder is fake-quantized (the cloud head
  stays float unless ``quant.quantize_head``), and the service an extractor queries is the int8
  encoder artifact + ``head.float.onnx``: exactly the fake-quant path q here, so the divergence acts
  on what the service answers. The twin gets no release transform (noise, dropout).
* ``frozen``: the paper's reference, "the original full-precision model": a frozen copy of the
  network's float function (fake quantization off, BatchNorm in eval mode, no gradient) taken when
  the divergence starts. Trained with ``--from FLOAT_RUN`` and ``start_epoch`` 1 (QAT fine-tuning
  of a trained float model, the setting the paper describes), the copy *is* that float model; from
  scratch with ``start_epoch`` N > 1 it is the float function after N-1 epochs. The reference then
  stays put while the quantized network moves away from it. A run cannot be resumed past the
  snapshot (it is not checkpointed): retrain it.

Learned quantiser scales. With ``--set quant.act_scales=learned`` the activation grids are learned
(LSQ; :func:`qdefend.quant.learned_scale_fake_quantize`), a part of q the float reference does not
have, so the divergence gets a gradient of its own: the paper's "modifies the quantization process".

Keeping top-1. The KL against a detached reference is unbounded (q can put ~0 mass where fp has
some), and its steepest direction lowers q's probability of fp's top class, i.e. of the label. Two
guards: the per-sample clip ``max_kl`` (a sample past it gets no divergence gradient) bounds the
term, and with ``only_correct`` the term acts only on samples the fake-quant network classifies
correctly, so a sample the divergence pushed over the decision boundary is left to the CE alone
until it is correct again. The divergence never trains a wrong decision.

What it can and cannot do. Under straight-through rounding the fake-quant network's gradient is
its float twin's (but for the activation clamps), so with ``reference = twin`` and observed grids a
step that moves q moves the next step's fp along with it: the term has almost no direction that
separates the two. Measured (Fashion-MNIST, 3 epochs, T 4): the epoch-end KL stays ~1e-4 nats at
weight 0.5 and 3, ~1e-3 at T 1, and KnockoffNets fidelity does not move; a large weight only costs
accuracy. The frozen reference and learned scales give it a direction (``benchmarks/defenses_ii.py
--study divqat`` measures both). More generally, any defense that keeps the top-1 answer on
in-distribution queries leaves the attacker the labels, so it cannot push a clone's fidelity below
a labels-only clone's (``copycat``); out-of-distribution queries (the ``mnist5k`` transfer set
against a Fashion-MNIST victim) have no label to keep, so there the soft answers are all a clone
learns from.

The defense releases nothing (``release_spec`` None): the exported encoder is a plain int8
encoder. Service-side output post-processing (rounding, top-k, reverse sigmoid) that composes
with it lives in :mod:`qdefend.defenses.output`.

Paper: Khaled et al., "DivQAT", arXiv 2512.23948 (its exact weight, sign and temperature are not
public; the values here are qdefend's, measured in benchmarks/defenses_ii.py).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_choice, check_number, require
from .. import quant as _quant  # noqa: F401  (sets TORCHAO_FORCE_SKIP_LOADING_SO_FILES before torchao loads)
from ..errors import QdefendError
from .base import Defense, EpochContext, StepContext
from ..data import batches

__all__ = ["DivQATConfig", "DivQAT", "REFERENCES", "divergence", "divergence_loss", "float_twin", "frozen_float_copy",
           "has_fake_quant"]

REFERENCES = ("twin", "frozen")
NO_TWIN = ("defense 'divqat' needs a fake-quantized network to diverge from its float twin, but this run "
           "has none: train with --qat int8 (e.g. qdefend train --qat int8 --defense divqat)")


@dataclass
class DivQATConfig:
    weight: float = 0.5  # weight of the divergence term; 0 turns it off (plain QAT)
    temperature: float = 4.0  # T of the softened distributions; the term is scaled by T^2
    max_kl: float = 0.5  # per-sample clip of KL (nats, at temperature T), so the term is bounded
    start_epoch: int = 1  # 1-based first epoch with the term (e.g. 2: one plain QAT epoch first)
    only_correct: bool = True  # apply the term only where the fake-quant top-1 equals the label
    eval_samples: int = 1000  # validation images for the epoch-end KL / agreement report (0: off)
    reference: str = "twin"  # twin: the network's own float twin; frozen: a frozen float copy (see the docstring)

    def __post_init__(self):
        p = "defense.params.divqat"
        check_number(self.weight, f"{p}.weight", lo=0, example=0.5)
        check_number(self.temperature, f"{p}.temperature", lo=0, lo_open=True, example=4)
        check_number(self.max_kl, f"{p}.max_kl (the KL term is unbounded without it)", lo=0, lo_open=True,
                     fix=f"--set {p}.max_kl=0.5")
        self.start_epoch = check_number(self.start_epoch, f"{p}.start_epoch (1-based)", lo=1, integer=True,
                                        fix=f"--set {p}.start_epoch=1")
        require(isinstance(self.only_correct, bool),
                f"{p}.only_correct must be true or false, got {self.only_correct!r}: e.g. --set {p}.only_correct=true")
        self.eval_samples = check_number(self.eval_samples, f"{p}.eval_samples", lo=0, integer=True, example=1000)
        check_choice(self.reference, f"{p}.reference", REFERENCES, fix=f"--set {p}.reference=frozen")


# ------------------------------------------------------------------------------ the divergence


def divergence(q_logits: torch.Tensor, fp_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample KL(softmax(fp / T) || softmax(q / T)), shape (N,); differentiable in q only."""
    log_p = F.log_softmax(fp_logits.detach().float() / temperature, dim=1)
    log_q = F.log_softmax(q_logits.float() / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def divergence_loss(q_logits: torch.Tensor, fp_logits: torch.Tensor, *, weight: float, temperature: float,
                    max_kl: float = math.inf, labels: torch.Tensor | None = None) -> torch.Tensor:
    """-weight * T^2 * mean_i m_i * min(KL_i, max_kl); m_i = [argmax q_i == labels_i] when labels
    are given (else 1). Minimising it raises the KL up to the clip; clipped samples get no gradient."""
    kl = divergence(q_logits, fp_logits, temperature).clamp(max=max_kl)
    if labels is not None:
        kl = kl * (q_logits.detach().argmax(1) == labels).to(kl.dtype)
    return -weight * temperature ** 2 * kl.mean()


# ------------------------------------------------------------------------------ the float twin


def _fake_quant_modules(modules) -> list[nn.Module]:
    from torchao.quantization.pt2e import FakeQuantizeBase

    return [m for mod in modules for m in mod.modules() if isinstance(m, FakeQuantizeBase)]


def has_fake_quant(*modules: nn.Module) -> bool:
    """True when any of ``modules`` holds a torchao pt2e fake-quant module (a QAT-prepared graph)."""
    return bool(_fake_quant_modules(modules))


@contextmanager
def float_twin(*modules: nn.Module) -> Iterator[None]:
    """Inside the block ``modules`` compute in full precision: every fake-quant module is switched
    off (no rounding, no range update). On exit every buffer of ``modules`` gets its value from
    before the block back: the fake-quant / observer switches and the BatchNorm running statistics
    a train-mode forward updates. Restored through ``.data`` so that the autograd graph of a
    forward made before the block (the fake-quant step whose backward comes later) stays valid."""
    from torchao.quantization.pt2e import disable_fake_quant, disable_observer

    saved = [(b, b.detach().clone()) for mod in modules for b in mod.buffers()]
    try:
        for fq in _fake_quant_modules(modules):
            disable_observer(fq)
            disable_fake_quant(fq)
        yield
    finally:
        for b, v in saved:
            if b.shape == v.shape:
                b.data.copy_(v)
            else:  # an observer buffer resized from its empty initial shape
                b.data = v


def frozen_float_copy(module: nn.Module) -> nn.Module:
    """A frozen full-precision copy of ``module``: deep-copied, every fake-quant module off (no
    rounding, no range update), evaluation mode (BatchNorm running statistics), no gradient."""
    from torchao.quantization.pt2e import disable_fake_quant, disable_observer

    ref = copy.deepcopy(module).eval()
    for fq in _fake_quant_modules([ref]):
        disable_observer(fq)
        disable_fake_quant(fq)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# ------------------------------------------------------------------------------ the defense


class DivQAT(Defense):
    """Divergence from the float twin inside QAT; see the module docstring."""

    name = "divqat"
    Config = DivQATConfig
    requires_qat = True  # build_run refuses --qat none before training starts

    def __init__(self, config=None):
        super().__init__(config)
        self._checked = False
        self._frozen: tuple[nn.Module, nn.Module] | None = None  # reference = frozen: (encoder, head)

    @property
    def first_defended_epoch(self) -> int:
        """The divergence acts from ``start_epoch``."""
        return self.config.start_epoch if self.config.weight > 0 else 1

    def _check(self, *modules: nn.Module) -> None:
        if not self._checked:
            if not has_fake_quant(*modules):
                raise QdefendError(NO_TWIN)
            self._checked = True

    def twin_logits(self, x: torch.Tensor, encoder: nn.Module, head: nn.Module) -> torch.Tensor:
        """head(encoder(x)) with fake quantization off, without autograd (the detached reference)."""
        with torch.no_grad(), float_twin(encoder, head):
            return head(encoder(x))

    def _snapshot(self, encoder: nn.Module, head: nn.Module) -> None:
        self._check(encoder, head)
        self._frozen = (frozen_float_copy(encoder), frozen_float_copy(head))

    def reference_logits(self, x: torch.Tensor, encoder: nn.Module, head: nn.Module) -> torch.Tensor:
        """The reference's logits on ``x`` (detached): the frozen copy's once taken, else the twin's."""
        if self._frozen is not None:
            fe, fh = self._frozen
            with torch.no_grad():
                return fh(fe(x))
        if self.config.reference == "frozen":
            raise QdefendError("defense 'divqat' with reference=frozen lost its frozen reference (a run resumed "
                               "after the divergence started; the copy is not checkpointed): retrain the run "
                               "from the start into a new --out directory, without --resume")
        return self.twin_logits(x, encoder, head)

    def on_train_start(self, ctx: EpochContext) -> dict[str, float]:
        if self.config.reference == "frozen" and self.config.start_epoch == 1:
            self._snapshot(ctx.encoder, ctx.head)
        return {}

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._check(ctx.encoder, ctx.head)
        c = self.config
        if c.weight == 0 or ctx.epoch + 1 < c.start_epoch:
            return {}
        fp = self.reference_logits(ctx.x, ctx.encoder, ctx.head)
        return {"divergence": divergence_loss(ctx.logits, fp, weight=c.weight, temperature=c.temperature,
                                              max_kl=c.max_kl, labels=ctx.y if c.only_correct else None)}

    @torch.no_grad()
    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """KL (unclipped, at T) and top-1 agreement between the fake-quant network and its
        reference on the first ``eval_samples`` validation images (networks in eval mode). With
        ``reference = frozen`` the copy is taken here at the end of epoch ``start_epoch - 1``."""
        c = self.config
        if c.reference == "frozen" and self._frozen is None and ctx.epoch + 2 == c.start_epoch:
            self._snapshot(ctx.encoder, ctx.head)
        n = min(c.eval_samples, len(ctx.data.val))
        if n == 0 or not has_fake_quant(ctx.encoder, ctx.head):
            return {}

        dev = next(ctx.head.parameters()).device
        kls, agree, seen = [], 0, 0
        for xb, _ in batches(ctx.data.val, 256, shuffle=False):
            xb = xb[: n - seen]
            x = torch.from_numpy(ctx.data.normalization.apply(xb)).to(dev)
            q = ctx.head(ctx.encoder(x))
            # before a frozen copy is taken (epochs ahead of start_epoch) the report is against the twin
            fp = self.reference_logits(x, ctx.encoder, ctx.head) if self._frozen is not None else \
                self.twin_logits(x, ctx.encoder, ctx.head)
            kls.append(divergence(q, fp, c.temperature))
            agree += int((q.argmax(1) == fp.argmax(1)).sum())
            seen += len(xb)
            if seen >= n:
                break
        return {"kl": float(torch.cat(kls).mean()), "top1_agreement": agree / seen}
