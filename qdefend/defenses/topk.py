"""Top-k pruning at the cut: zero the ``ratio`` fraction of smallest-|z| elements of each sample.

k = round(ratio * D) per sample (D = elements per sample, Python's round-half-even, as the device
runtime's ``topk_prune`` step); the k smallest |z| are set to +0. Ties are broken towards the lower
flat index (a stable sort), so the result is deterministic on every device; numpy's argpartition
in ``qdefend/edge/runtime.py`` picks among equal values in an unspecified order, so the two agree
exactly whenever the k-th and (k+1)-th smallest |z| of a sample differ (always for continuous
features; also when the tie is among exact zeros, e.g. after dropout). Applied at training and
inference; gradients flow through the kept elements only.

Paper: Li et al., "ResSFL", CVPR 2022 (``prune_defense`` baseline); Xia et al., CEM, CVPR 2025
(arXiv 2503.00383), Sec. 5 baselines ("Top-k prune").
"""

from __future__ import annotations

from dataclasses import dataclass


from ..checks import check_number
from ..edge.release import topk_prune_torch
from .base import Defense

__all__ = ["TopkConfig", "TopkPrune"]


@dataclass
class TopkConfig:
    ratio: float = 0.5  # fraction of each sample's elements zeroed (the smallest |z|)

    def __post_init__(self):
        check_number(self.ratio, "defense.params.topk.ratio", lo=0, hi=1, hi_open=True, example=0.5)


class TopkPrune(Defense):
    """Zero the smallest-|z| fraction of each sample's released features (train and inference)."""

    name = "topk"
    Config = TopkConfig

    def release(self, z, generator=None):
        return topk_prune_torch(z, self.config.ratio)

    def release_spec(self):
        return {"type": "topk_prune", "ratio": float(self.config.ratio)}
