"""Additive feature noise at the cut, at training and inference: Gaussian, Laplace, and local DP.

* ``noise``: z~ = z + sigma * eps, eps ~ N(0, I); the simplest split-learning defense and the noise
  floor CEM builds on.
* ``laplace``: z~ = z + Laplace(0, scale) per element (std sqrt(2) * scale).
* ``ldp``: the same mechanisms calibrated to a local differential-privacy budget epsilon, as the
  CEM/ResSFL code's ``local_dp_laplace`` baseline: Laplace with scale = sensitivity / epsilon, or
  Gaussian with sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon. The sigmoid cut puts
  every feature in [0, 1], so the per-element sensitivity is 1 and each released element is
  epsilon-LDP (epsilon, delta for the Gaussian, a bound stated for epsilon < 1). The whole feature
  vector of d elements is (d * epsilon)-LDP by composition: a per-element budget, as in the papers.
  The guarantee needs the features inside [0, sensitivity], so ``ldp`` refuses features outside it
  (a cut without sigmoid, or another noise applied before it in the stack).

The three are separate registered defenses (not options of ``noise``) so each has its own
validated parameters, existing ``noise`` configs keep their meaning, and a stack names what it does
(``ldp+nopeek``). Each release_spec is a step ``qdefend.edge.runtime`` already applies
(``gaussian_noise`` / ``laplace_noise``).

Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383), Sec. 4 (Gaussian);
Li et al., "ResSFL", CVPR 2022 and Dwork & Roth, "The Algorithmic Foundations of Differential
Privacy", 2014, Sec. 3.3 / App. A (Laplace and Gaussian mechanisms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_choice, check_number
from ..edge.release import gaussian_noise_torch, laplace_noise_torch
from ..errors import QdefendError
from .base import Defense

__all__ = [
    "NoiseConfig", "GaussianNoise", "LaplaceConfig", "LaplaceNoise", "LDPConfig", "LocalDPNoise",
]


@dataclass
class NoiseConfig:
    sigma: float = 0.1  # standard deviation, in units of the released feature (sigmoid output: [0,1])

    def __post_init__(self):
        check_number(self.sigma, "defense.params.noise.sigma", lo=0, example=0.05)


class GaussianNoise(Defense):
    """Additive Gaussian noise on the released features (train and inference)."""

    name = "noise"
    Config = NoiseConfig

    def release(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return gaussian_noise_torch(z, self.config.sigma, generator)

    def release_spec(self):
        return {"type": "gaussian_noise", "sigma": float(self.config.sigma)}


@dataclass
class LaplaceConfig:
    scale: float = 0.1  # Laplace scale b (std sqrt(2) * b), in units of the released feature

    def __post_init__(self):
        check_number(self.scale, "defense.params.laplace.scale", lo=0, example=0.1)


class LaplaceNoise(Defense):
    """Additive Laplace noise on the released features (train and inference)."""

    name = "laplace"
    Config = LaplaceConfig

    def release(self, z, generator=None):
        return laplace_noise_torch(z, self.config.scale, generator)

    def release_spec(self):
        return {"type": "laplace_noise", "scale": float(self.config.scale)}


MECHANISMS = ("laplace", "gaussian")


@dataclass
class LDPConfig:
    epsilon: float = 10.0  # per-element privacy budget (ResSFL's local_dp_laplace sweeps 10 .. 20)
    mechanism: str = "laplace"  # laplace (pure epsilon-LDP) | gaussian ((epsilon, delta)-LDP)
    delta: float = 1e-4  # only for the Gaussian mechanism
    sensitivity: float = 1.0  # per-element range of the features: 1 for the sigmoid cut

    def __post_init__(self):
        p = "defense.params.ldp"
        check_number(self.epsilon, f"{p}.epsilon", lo=0, lo_open=True, example=10)
        check_choice(self.mechanism, f"{p}.mechanism", MECHANISMS)
        check_number(self.delta, f"{p}.delta", lo=0, hi=1, lo_open=True, hi_open=True, example="1e-4")
        check_number(self.sensitivity, f"{p}.sensitivity", lo=0, lo_open=True,
                     fix=f"--set {p}.sensitivity=1.0 (sigmoid features lie in [0, 1])")

    @property
    def scale(self) -> float:
        """Laplace scale b = sensitivity / epsilon."""
        return self.sensitivity / self.epsilon

    @property
    def sigma(self) -> float:
        """Gaussian sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon."""
        return self.sensitivity * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon


class LocalDPNoise(Defense):
    """Laplace or Gaussian noise calibrated to a per-element local-DP budget epsilon."""

    name = "ldp"
    Config = LDPConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._range_checked = False

    def _check_range(self, z: torch.Tensor) -> None:
        if self._range_checked or z.numel() == 0:
            return
        lo, hi = float(z.detach().min()), float(z.detach().max())
        if lo < 0 or hi > self.config.sensitivity:
            raise QdefendError(
                f"ldp assumes features in [0, {self.config.sensitivity}] but got [{lo:.4g}, {hi:.4g}]: "
                "use a sigmoid cut (--set model.sigmoid=true), put ldp first in the stack, or raise "
                "--set defense.params.ldp.sensitivity=..."
            )
        self._range_checked = True

    def release(self, z, generator=None):
        self._check_range(z)
        if self.config.mechanism == "laplace":
            return laplace_noise_torch(z, self.config.scale, generator)
        return gaussian_noise_torch(z, self.config.sigma, generator)

    def release_spec(self):
        if self.config.mechanism == "laplace":
            return {"type": "laplace_noise", "scale": float(self.config.scale)}
        return {"type": "gaussian_noise", "sigma": float(self.config.sigma)}
