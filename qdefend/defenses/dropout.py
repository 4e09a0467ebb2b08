"""Feature dropout at the cut: zero each element of z with probability p, without rescaling.

Applied at training AND inference (it is a release transform, not a regulariser): the cloud never
sees the dropped elements. Unlike ``nn.Dropout`` the kept elements are not scaled by 1/(1-p), as
in the CEM/ResSFL code, so the head learns on exactly what a device sends. The release_spec is
the device runtime's ``dropout`` step (keep an element when a uniform draw is >= p).

Paper: Li et al., "ResSFL: A Resistance Transfer Framework for Defending Model Inversion Attack
in Split Federated Learning", CVPR 2022 (dropout baseline); Xia et al., CEM, CVPR 2025
(arXiv 2503.00383), Sec. 5 baselines.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..checks import check_number
from ..edge.release import dropout_torch
from .base import Defense

__all__ = ["DropoutConfig", "FeatureDropout"]


@dataclass
class DropoutConfig:
    p: float = 0.2  # probability of zeroing each released element

    def __post_init__(self):
        check_number(self.p, "defense.params.dropout.p", lo=0, hi=1, hi_open=True, example=0.2)


class FeatureDropout(Defense):
    """Zero each released feature element with probability p, no rescaling (train and inference)."""

    name = "dropout"
    Config = DropoutConfig

    def release(self, z, generator=None):
        return dropout_torch(z, self.config.p, generator)

    def release_spec(self):
        return {"type": "dropout", "p": float(self.config.p)}
