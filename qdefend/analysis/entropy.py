"""An ESTIMATE of H(x | z~) per cut under Gaussian feature noise, and the MSE bound it implies.

CEM's bound: any inversion attacker's mean squared error per pixel satisfies
    xi >= exp(2 H(x | z~) / d) / (2 pi e),   d = number of pixel values (C*H*W),
for z~ = z + sigma * eps, eps ~ N(0, I). We estimate H(x | z~) = h(x) - I(x; z~) with

* h(x): the Gaussian estimate 1/2 sum_i log(2 pi e lambda_i) over the eigenvalues of the pixel
  covariance, streamed over the evaluation split, plus the dequantisation variance 1/(12 * 255^2)
  per pixel (8-bit pixels spread uniformly over their bin; without it constant border pixels
  give log 0). The Gaussian is the maximum-entropy law for that covariance, so this over-states
  h(x) for real images.
* I(x; z~) <= 1/2 logdet(I + Cov(z) / sigma^2): the Gaussian-channel bound. z is a function of x,
  so I(x; z~) = I(z; z~) = h(z~) - h(sigma eps), and h(z~) is at most the Gaussian entropy of its
  covariance Cov(z) + sigma^2 I. Cov(z)'s spectrum is taken from the Gram matrix of n centred
  samples (the same nonzero eigenvalues as the d_z x d_z covariance; rank <= n - 1), so the
  cost is O(n^2 d_z) whatever d_z is. With d_z > n the sample spectrum is truncated.

Both approximations (Gaussian h(x), sampled spectrum) make the result an estimate, not a proven
bound; :class:`EntropyEstimate` says so, and the partition report prints "estimate is loose" when
the implied bound exceeds the MSE an attacker actually reached. With sigma = 0 the channel is
noiseless, I(x; z) is unbounded for continuous x, and the bound is vacuous (0).

Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383), Theorem 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import QdefendError

__all__ = [
    "DEQUANT_VAR", "MomentAccumulator", "gaussian_entropy", "gaussian_channel_info", "mse_lower_bound",
    "EntropyEstimate", "estimate_entropy",
]

DEQUANT_VAR = 1.0 / (12 * 255.0**2)  # variance of U(-1/510, 1/510): one 8-bit pixel bin
TWO_PI_E = 2 * math.pi * math.e


class MomentAccumulator:
    """Streaming mean and covariance (float64) of flattened rows: for the pixel covariance."""

    def __init__(self):
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def update(self, x) -> None:
        f = torch.as_tensor(x).reshape(len(x), -1).double()
        if self.s is None:
            self.s = torch.zeros(f.shape[1], dtype=torch.float64)
            self.ss = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.n += len(f)
        self.s += f.sum(0)
        self.ss += f.T @ f

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise QdefendError("the covariance needs >= 2 samples; evaluate on more images (raise --limit-eval)")
        mu = self.s / self.n
        return ((self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)).numpy()


def gaussian_entropy(cov: np.ndarray, *, jitter: float = DEQUANT_VAR) -> float:
    """Differential entropy (nats) of N(0, cov + jitter * I): 1/2 sum log(2 pi e lambda)."""
    lam = torch.linalg.eigvalsh(torch.as_tensor(np.asarray(cov), dtype=torch.float64)).clamp_min(0.0).numpy() + jitter
    if jitter <= 0 and (lam <= 0).any():
        return float("-inf")
    return float(0.5 * np.sum(np.log(TWO_PI_E * lam)))


def _spectrum(z) -> np.ndarray:
    """Nonzero eigenvalues of the sample covariance of the rows of z (via the n x n Gram matrix)."""
    f = torch.as_tensor(z).reshape(len(z), -1).double()
    if len(f) < 2:
        raise QdefendError("the feature spectrum needs >= 2 samples; raise entropy_samples")
    f = f - f.mean(0)
    gram = f @ f.T / (len(f) - 1) if f.shape[1] >= len(f) else f.T @ f / (len(f) - 1)
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).numpy()


def gaussian_channel_info(z, sigma: float) -> float:
    """Upper estimate of I(x; z + sigma eps) in nats: 1/2 sum log(1 + lambda_i / sigma^2) over the
    sample covariance spectrum of z (inf for sigma = 0 and any spread in z)."""
    if sigma < 0:
        raise QdefendError(f"sigma={sigma} must be >= 0, e.g. --sigma 0.1")
    lam = _spectrum(z)
    if sigma == 0:
        return float("inf") if (lam > 0).any() else 0.0
    return float(0.5 * np.sum(np.log1p(lam / sigma**2)))


def mse_lower_bound(h_cond: float, d: int) -> float:
    """CEM: xi >= exp(2 H(x|z~) / d) / (2 pi e), per pixel value (0 when H is -inf)."""
    if d < 1:
        raise QdefendError(f"d={d} must be the number of pixel values (C*H*W), e.g. 784 for Fashion-MNIST")
    if h_cond == float("-inf"):
        return 0.0
    return float(math.exp(min(2.0 * h_cond / d, 700.0)) / TWO_PI_E)


@dataclass
class EntropyEstimate:
    """One cut's estimate. ``bound`` is the implied MSE lower bound (an estimate: see module doc)."""

    sigma: float
    h_x: float  # nats, Gaussian estimate of the pixel entropy
    info: float  # nats, Gaussian-channel estimate of I(x; z~)
    h_cond: float  # nats, h_x - info
    bound: float  # per-pixel MSE implied by CEM's formula
    samples: int
    vacuous: bool

    @property
    def note(self) -> str:
        if self.vacuous:
            return "sigma = 0: no feature noise, I(x; z) is unbounded and the bound is vacuous (0)"
        return (f"estimate (Gaussian h(x) and Gaussian-channel I(x; z~) from {self.samples} samples), "
                "not a proven bound")

    def to_dict(self) -> dict:
        f = lambda v: v if math.isfinite(v) else None  # noqa: E731 (strict JSON)
        return {"sigma": self.sigma, "h_x_nats": f(self.h_x), "info_nats": f(self.info),
                "h_cond_nats": f(self.h_cond), "mse_bound": self.bound, "samples": self.samples,
                "vacuous": self.vacuous, "note": self.note}


def estimate_entropy(h_x: float, z, sigma: float, d: int) -> EntropyEstimate:
    """H(x | z~) = h_x - I(x; z~) and its MSE bound, for features ``z`` (N, ...) of N images."""
    info = gaussian_channel_info(z, sigma)
    h_cond = h_x - info
    return EntropyEstimate(sigma=float(sigma), h_x=float(h_x), info=info, h_cond=h_cond,
                           bound=mse_lower_bound(h_cond, d), samples=len(z), vacuous=sigma == 0)
