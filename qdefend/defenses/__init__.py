"""Privacy defenses, registered by name and composable with '+' (e.g. ``noise+nopeek``).

Release transforms (train and inference, applied on the device): ``noise`` (Gaussian), ``laplace``,
``ldp`` (Laplace/Gaussian calibrated to a local-DP epsilon), ``dropout``, ``topk``, ``shredder``
(learned additive noise). Training losses: ``nopeek`` (distance correlation), ``arl`` (SSIM hinge
against a simulated decoder attacker), ``patrol`` (ARL plus Taylor channel pruning of the encoder), ``cem`` (conditional entropy maximisation, wraps a noise),
``cem-slot`` (CEM with learned Slot Attention components instead of k-means).
Extraction, inside QAT: ``divqat`` (service-side output defenses: :mod:`.output`).
Both: ``vib-mask`` (variational bottleneck: KL loss, learned-variance sampling and a dynamic mask).
"""

from __future__ import annotations

from typing import Any

from ..config import DefenseConfig, from_dict
from ..errors import QdefendError
from ..registry import Registry
from .base import Defense, DefenseStack, EpochContext, StepContext
from .arl import ARL
from .cem import CEM
from .cem_slot import CEMSlot
from .divqat import DivQAT
from .dropout import FeatureDropout
from .noise import GaussianNoise, LaplaceNoise, LocalDPNoise
from .nopeek import NoPeek, distance_correlation
from .patrol import Patrol
from .shredder import Shredder
from .topk import TopkPrune
from .vib import VIBMask

DEFENSES: Registry[type[Defense]] = Registry("defense")
DEFENSES.register(help="no defense: features are released as the encoder computes them")(Defense)
DEFENSES.register()(GaussianNoise)
DEFENSES.register()(LaplaceNoise)
DEFENSES.register()(LocalDPNoise)
DEFENSES.register()(FeatureDropout)
DEFENSES.register()(TopkPrune)
DEFENSES.register()(NoPeek)
DEFENSES.register()(ARL)
DEFENSES.register()(Shredder)
DEFENSES.register(help="PATROL as the CEM code runs it: ARL plus Taylor channel pruning of the encoder late in training")(Patrol)
DEFENSES.register(help="CEM: per-class cluster variances of z pushed under the noise floor (needs noise)")(CEM)
DEFENSES.register(help="DivQAT: KL push of the fake-quant outputs away from the float twin (needs --qat int8)")(DivQAT)
DEFENSES.register(help="CEM with learned Slot Attention components instead of k-means (needs noise)")(CEMSlot)
DEFENSES.register(help="variational bottleneck (learned variance, sampled on the device) with a dynamic mask")(VIBMask)


def parse_stack(stack: str) -> list[str]:
    """``"noise+nopeek"`` -> ``["noise", "nopeek"]``; ``"none"`` or ``""`` -> ``[]``."""
    names = [n.strip() for n in stack.split("+") if n.strip()]
    if names == ["none"] or not names:
        return []
    for n in names:
        DEFENSES.get(n)  # raises, listing the valid names
        if n == "none":
            raise QdefendError(f"'none' cannot be combined with other defenses in '{stack}'")
    if len(set(names)) != len(names):
        raise QdefendError(f"defense stack '{stack}' names a defense twice; write each once")
    return names


def build_defense(cfg: DefenseConfig) -> DefenseStack:
    """Construct (and validate) every defense of ``cfg.stack`` with its parameters."""
    names = parse_stack(cfg.stack)
    extra = sorted(set(cfg.params) - set(names))
    if extra:
        raise QdefendError(
            f"parameters given for defense '{extra[0]}' which is not in the stack '{cfg.stack}': "
            f"add it to --defense or drop its parameters"
        )
    defenses = []
    for n in names:
        cls = DEFENSES.get(n)
        conf = from_dict(cls.Config, dict(cfg.params.get(n, {})), where=f"defense.params.{n}")
        defenses.append(cls(conf))
    for d in defenses:  # defenses that read their neighbours (CEM takes sigma from the noise)
        if hasattr(d, "bind_stack"):
            d.bind_stack(defenses)
    return DefenseStack(defenses)


def resolved_params(stack: DefenseStack) -> dict[str, dict[str, Any]]:
    """Every parameter of every defense in the stack, defaults included (for config.toml)."""
    return {d.name: d.config_dict() for d in stack.defenses}


__all__ = [
    "DEFENSES", "Defense", "DefenseStack", "StepContext", "EpochContext",
    "build_defense", "parse_stack", "resolved_params", "distance_correlation",
    "CEM", "CEMSlot", "GaussianNoise", "LaplaceNoise", "LocalDPNoise", "FeatureDropout", "TopkPrune", "NoPeek", "ARL", "Shredder",
    "VIBMask", "DivQAT",
]
