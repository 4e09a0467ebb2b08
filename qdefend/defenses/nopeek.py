"""NoPeek: penalise the distance correlation between the input and the cut features.

loss += alpha * dCor(x, z) per batch. dCor is computed from the pairwise Euclidean distance
matrices of the flattened batch, a_ij = ||x_i - x_j|| and b_ij = ||z_i - z_j||, double centred
(A = a - row mean - column mean + grand mean, likewise B):

    dCov^2(x, z) = mean(A * B),   dCor^2 = dCov^2(x, z) / sqrt(dCov^2(x, x) * dCov^2(z, z)).

dCor lies in [0, 1], is 1 for identical (or similar, i.e. scaled-rotated-shifted) inputs and
tends to 0 for independent ones (in low dimension: the batch V-statistic is biased upwards); it
also sees non-linear dependence that Pearson correlation misses. z is the encoder output before
the release transform (the quantity the encoder controls; release noise is independent of x);
x is the network input as the encoder sees it (dCor is invariant to the per-dataset affine
normalisation when it is the same for all channels). Square roots are guarded with ``eps``:
distances are sqrt(d^2 + eps) - sqrt(eps) (diagonal exactly 0, gradient finite) and dCor is
sqrt(max(dCor^2, eps)) (gradient at most 1 / (2 sqrt(eps))).

High-dimensional caveat: this V-statistic (the papers' estimator, the default) tends to 1 for
independent data when the dimension is large against the batch (measured: 0.97 for independent
784-dim x and 392-dim z at n = 128), so its value is an offset plus a dependence signal. With
``estimator = "u"`` the loss is instead the bias-corrected squared distance correlation R* of
Szekely & Rizzo (U-centred distance matrices with a zero diagonal): about 0 for
independent data at any dimension (measured -0.01 for the case above), 1 for identical inputs,
and it can be slightly negative (batches under 4 samples contribute 0).

Paper: Vepakomma et al., "NoPeek: Information leakage reduction to share activations in distributed
deep learning", ICDMW 2020 (arXiv 2008.09161); Szekely et al., "Measuring and testing dependence by
correlation of distances", Ann. Statist. 2007 (dCor); Szekely & Rizzo, "Partial distance
correlation with methods for dissimilarities", Ann. Statist. 2014 (U-centring, R*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_choice, check_number
from .base import Defense, StepContext

__all__ = ["NoPeekConfig", "NoPeek", "distance_correlation", "bias_corrected_dcor2", "pairwise_distances"]


def pairwise_distances(v: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """(n, n) Euclidean distances between the rows of v (n, ...), differentiable everywhere."""
    v = v.reshape(len(v), -1)
    sq = (v * v).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * v @ v.T).clamp_min(0)
    return torch.sqrt(d2 + eps) - math.sqrt(eps)


def _double_centre(a: torch.Tensor) -> torch.Tensor:
    return a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()


def _u_centre(a: torch.Tensor) -> torch.Tensor:
    n = len(a)
    u = a - a.sum(0, keepdim=True) / (n - 2) - a.sum(1, keepdim=True) / (n - 2) + a.sum() / ((n - 1) * (n - 2))
    return u * (1 - torch.eye(n, dtype=a.dtype, device=a.device))


def _distance_matrices(x, z, eps, centre):
    if len(x) != len(z):
        raise ValueError(f"dCor needs batches of the same size, got {len(x)} and {len(z)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return centre(pairwise_distances(x.to(dtype), eps)), centre(pairwise_distances(z.to(dtype), eps))


def distance_correlation(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Sample distance correlation (V-statistic) of two batches (same n, any trailing shapes), in [0, 1]."""
    A, B = _distance_matrices(x, z, eps, _double_centre)
    dcov2 = (A * B).mean().clamp_min(0)
    dvar = torch.sqrt(((A * A).mean() * (B * B).mean()).clamp_min(eps * eps))
    return torch.sqrt((dcov2 / (dvar + eps)).clamp_min(eps))


def bias_corrected_dcor2(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Bias-corrected squared distance correlation R* (U-centred; ~0 if independent, may be < 0); n >= 4."""
    if len(x) < 4:
        raise ValueError(f"the bias-corrected dCor needs a batch of at least 4, got {len(x)}")
    A, B = _distance_matrices(x, z, eps, _u_centre)
    return (A * B).sum() / (torch.sqrt(((A * A).sum() * (B * B).sum()).clamp_min(eps * eps)) + eps)


@dataclass
class NoPeekConfig:
    alpha: float = 1.0  # weight of dCor(x, z) in the loss (ResSFL sweeps 1.0 .. 2.0)
    estimator: str = "v"  # v: dCor, the papers' V-statistic | u: bias-corrected dCor^2 (R*)
    eps: float = 1e-9  # guard inside the square roots

    def __post_init__(self):
        p = "defense.params.nopeek"
        check_number(self.alpha, f"{p}.alpha", lo=0, example=1.0)
        check_choice(self.estimator, f"{p}.estimator", ("v", "u"))
        check_number(self.eps, f"{p}.eps", lo=0, hi=1e-3, lo_open=True, hi_open=True, example="1e-9")


class NoPeek(Defense):
    """Loss term alpha * dCor(x, z): decorrelate the released features from the input."""

    name = "nopeek"
    Config = NoPeekConfig

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.config.alpha == 0:
            return {}
        if self.config.estimator == "u":
            if len(ctx.x) < 4:
                return {"dcor": torch.zeros((), device=ctx.z.device)}
            return {"dcor": self.config.alpha * bias_corrected_dcor2(ctx.x, ctx.z, self.config.eps)}
        return {"dcor": self.config.alpha * distance_correlation(ctx.x, ctx.z, self.config.eps)}
