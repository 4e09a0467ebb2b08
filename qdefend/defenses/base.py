"""The defense contract used by the trainer, the exporter and the device runtime.

A defense contributes up to four things:

* ``release(z)``: the transform applied to the encoder's output before it leaves the device, at
  training AND inference (noise, dropout, masks). ``release_spec()`` describes it for the manifest so
  that ``qdefend.edge.runtime`` applies exactly the same transform on every artifact.
* ``loss_terms(ctx)``: extra terms added to the task loss (NoPeek, ARL, ...).
* ``encoder_loss_terms(ctx)``: terms whose gradient is taken first, w.r.t. the encoder alone, kept,
  and added to the encoder's gradients after the task backward (the CEM optimisation order).
* ``on_train_start(ctx)`` / ``on_epoch_end(ctx)``: hooks before the first step of a new run and
  after each epoch (cluster statistics, masks, ...).
* ``first_defended_epoch``: the first (1-based) epoch whose checkpoint the defense has shaped; the
  trainer picks its best checkpoint from that epoch on, so a run never ships (nor is attacked as)
  the undefended network of a defense that starts late (CEM from epoch 2, ARL after its warm-up).

Defenses compose: ``noise+nopeek`` builds a :class:`DefenseStack` applying each in order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed


@dataclass
class StepContext:
    """What a defense sees in one training step."""

    x: torch.Tensor  # normalised input batch
    y: torch.Tensor  # labels
    z: torch.Tensor  # encoder output before the release transform
    z_released: torch.Tensor  # what crosses the wire
    logits: torch.Tensor
    epoch: int  # 0-based
    step: int  # global step
    encoder: nn.Module
    head: nn.Module
    normalization: Any = None  # qdefend.data.Normalization, to map x back to [0,1] pixels
    lr: float | None = None  # the learning rate of this step (CEM couples its lambda to it)


@dataclass
class EpochContext:
    """What a defense sees at the end of an epoch."""

    epoch: int
    encoder: nn.Module
    head: nn.Module
    features: Any  # callable(split) -> (z, y) over a data split, encoder in eval mode, no release
    data: Any  # qdefend.data.SplitData
    epochs: int = 0  # epochs the run trains in all (0: not known)


class Defense:
    """Base class: a defense that does nothing. Subclasses set ``name`` and ``Config``."""

    name: ClassVar[str] = "none"
    Config: ClassVar[type] = type("NoConfig", (), {})
    requires_qat: ClassVar[bool] = False  # needs a fake-quantized network (--qat int8); build_run refuses others

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    @property
    def first_defended_epoch(self) -> int:
        return 1

    @property
    def needs_trained_network(self) -> str | None:
        """Why this defense must start from a trained run (``--from``), or None."""
        return None

    def release(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return z

    def release_spec(self) -> dict[str, Any] | None:
        return None

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def encoder_loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {}

    def on_train_start(self, ctx: EpochContext) -> dict[str, float]:
        """Before the first step of a new run (``ctx.epoch`` is -1): e.g. CEM's statistics of the
        trained network a fine-tune starts from."""
        return {}

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        return {}

    def module(self) -> nn.Module | None:
        """Trainable or stateful parts to checkpoint (e.g. a simulated attacker)."""
        return None

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}

    def optimizer_states(self) -> dict[str, dict]:
        """State dicts of optimizers the defense runs itself (checkpointed so a resumed run keeps them)."""
        return {}

    def load_optimizer_states(self, states: dict[str, dict]) -> None:
        pass


class OwnOptimizer:
    """Mixin for a defense that trains its own module with its own Adam, built lazily (the module's
    shape is known at the first batch): a state loaded before that is applied when it is built."""

    _opt: torch.optim.Optimizer | None = None
    _opt_state: dict | None = None

    def _adam(self, params, lr: float) -> torch.optim.Optimizer:
        if self._opt is None:  # under torchrun it averages its gradients over the ranks before each step
            self._opt = distributed.current().attach(torch.optim.Adam(params, lr=lr))
            if self._opt_state is not None:
                self._opt.load_state_dict(self._opt_state)
                self._opt_state = None
        return self._opt

    def optimizer_states(self) -> dict[str, dict]:
        if self._opt is not None:
            return {self.name: self._opt.state_dict()}
        return {self.name: self._opt_state} if self._opt_state is not None else {}

    def load_optimizer_states(self, states: dict[str, dict]) -> None:
        if self.name in states:
            self._opt, self._opt_state = None, states[self.name]


class DefenseStack(Defense):
    """Defenses applied in the order written (``noise+nopeek``)."""

    name = "stack"

    def __init__(self, defenses: list[Defense]):
        super().__init__(None)
        self.defenses = defenses
        self._modules = nn.ModuleDict(
            {d.name: d.module() for d in defenses if d.module() is not None}
        )

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.defenses]

    @property
    def requires_qat(self) -> bool:
        return any(d.requires_qat for d in self.defenses)

    @property
    def first_defended_epoch(self) -> int:
        return max([d.first_defended_epoch for d in self.defenses], default=1)

    @property
    def needs_trained_network(self) -> str | None:
        return next((why for d in self.defenses if (why := d.needs_trained_network)), None)

    def release(self, z, generator=None):
        for d in self.defenses:
            z = d.release(z, generator)
        return z

    def release_spec(self) -> dict[str, Any] | None:
        steps = [s for d in self.defenses if (s := d.release_spec()) is not None]
        return {"steps": steps} if steps else {"steps": []}

    def _merge(self, method: str, ctx) -> dict:
        out = {}
        for d in self.defenses:
            for k, v in getattr(d, method)(ctx).items():
                out[f"{d.name}/{k}"] = v
        return out

    def loss_terms(self, ctx):
        return self._merge("loss_terms", ctx)

    def encoder_loss_terms(self, ctx):
        return self._merge("encoder_loss_terms", ctx)

    def on_train_start(self, ctx):
        return self._merge("on_train_start", ctx)

    def on_epoch_end(self, ctx):
        return self._merge("on_epoch_end", ctx)

    def module(self) -> nn.Module | None:
        return self._modules if len(self._modules) else None

    def optimizer_states(self) -> dict[str, dict]:
        return {k: v for d in self.defenses for k, v in d.optimizer_states().items()}

    def load_optimizer_states(self, states: dict[str, dict]) -> None:
        for d in self.defenses:
            d.load_optimizer_states(states)
