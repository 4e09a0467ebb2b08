"""Gaussian feature noise: z~ = z + sigma * eps, eps ~ N(0, I), at training and inference.

The simplest split-learning defense and the noise floor CEM builds on.
Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383), Sec. 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QdefendError
from .base import Defense


@dataclass
class NoiseConfig:
    sigma: float = 0.1  # standard deviation, in units of the released feature (sigmoid output: [0,1])

    def __post_init__(self):
        if not (self.sigma >= 0):
            raise QdefendError(
                f"noise sigma must be >= 0, got {self.sigma}: e.g. --set defense.params.noise.sigma=0.05"
            )


class GaussianNoise(Defense):
    """Additive Gaussian noise on the released features (train and inference)."""

    name = "noise"
    Config = NoiseConfig

    def release(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.sigma == 0:
            return z
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return z + self.config.sigma * eps

    def release_spec(self):
        return {"type": "gaussian_noise", "sigma": float(self.config.sigma)}
