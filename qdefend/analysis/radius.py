"""Intra-class mean-squared radius R_c^2 per cut candidate, and the Golden Partition Zone locator.

R_c^2 = mean over classes c of (1/N_c) sum_{i in c} ||f_i - mu_c||^2 on flattened features f_i.
A contracting radius marks the layer where the representation turns from "features" into
"decisions"; cutting after that transition is what the GPZ paper finds inversion-resistant.

* :class:`RadiusAccumulator` streams a whole split: per class it keeps the count N_c, the sum of
  features s_c and the sum of squared norms q_c (float64), so
  R_c^2 = mean_c (q_c / N_c - ||s_c / N_c||^2) without holding the features. Labels can be the
  true ones or the model's predictions (the GPZ code uses predictions, on one batch; we use the
  whole split).
* :func:`relative_drops`: d_j = (R_{j-1}^2 - R_j^2) / R_{j-1}^2 between consecutive candidates.
* :func:`locate_zone`: the zone starts at the candidate right after the largest drop and runs on
  while the curve stays flat (|d| < ``flat``, 0.2 as in their code). A second zone is reported when
  the second-largest drop is *isolated*: it is itself a transition (d >= ``flat``), it is not
  adjacent to the largest one, and every drop strictly between the two has |d| < ``flat`` -- a
  plateau separates two distinct transitions. (Our reading of "the second zone when the
  second-largest drop is isolated, |d| < 0.2 between"; adjacent large drops are one transition
  and give one zone, and a drop below ``flat`` is no transition at all.)

Paper: Liu et al., "Partitioning for Intrinsic Model Inversion Resistance in Collaborative
Inference" (Golden Partition Zone), arXiv 2506.15412.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import QdefendError

__all__ = ["RadiusAccumulator", "class_radius", "relative_drops", "Zone", "ZoneResult", "locate_zone", "FLAT"]

FLAT = 0.2  # |d| below this counts as "flat" (the GPZ code's threshold)


def _flat2d(features) -> torch.Tensor:
    t = torch.as_tensor(features)
    if t.ndim < 1:
        raise ValueError("features need a batch dimension: (N, ...)")
    return t.reshape(t.shape[0], -1).double()


def class_radius(features, labels, num_classes: int | None = None) -> float:
    """R_c^2 of one set of features by the direct formula (holds them all; tests, single batches)."""
    f = _flat2d(features)
    y = torch.as_tensor(labels).long()
    vals = []
    for c in range(int(num_classes or (int(y.max()) + 1 if len(y) else 0))):
        fc = f[y == c]
        if len(fc):
            vals.append(float(((fc - fc.mean(0)) ** 2).sum(1).mean()))
    return float(np.mean(vals)) if vals else float("nan")


class RadiusAccumulator:
    """Streaming R_c^2: call :meth:`update` per batch, read :meth:`value` at the end."""

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise QdefendError(f"num_classes={num_classes} must be >= 1, e.g. RadiusAccumulator(10)")
        self.num_classes = num_classes
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.sq = torch.zeros(num_classes, dtype=torch.float64)
        self.sum: torch.Tensor | None = None

    def update(self, features, labels) -> None:
        f = _flat2d(features).cpu()
        y = torch.as_tensor(labels).long().cpu()
        if len(y) != len(f):
            raise ValueError(f"{len(f)} feature rows but {len(y)} labels")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}")
        if self.sum is None:
            self.sum = torch.zeros(self.num_classes, f.shape[1], dtype=torch.float64)
        elif f.shape[1] != self.sum.shape[1]:
            raise ValueError(f"feature size changed from {self.sum.shape[1]} to {f.shape[1]}")
        self.count += torch.bincount(y, minlength=self.num_classes).double()
        self.sum.index_add_(0, y, f)
        self.sq.index_add_(0, y, (f * f).sum(1))

    def per_class(self) -> np.ndarray:
        """(1/N_c) sum ||f_i - mu_c||^2 per class; NaN for a class never seen."""
        out = np.full(self.num_classes, np.nan)
        if self.sum is None:
            return out
        seen = self.count > 0
        n = self.count[seen]
        mu = self.sum[seen] / n[:, None]
        r = (self.sq[seen] / n - (mu * mu).sum(1)).clamp_min(0.0)  # rounding can dip below 0
        out[seen.numpy()] = r.numpy()
        return out

    def value(self) -> float:
        """R_c^2: the mean of :meth:`per_class` over the classes seen."""
        pc = self.per_class()
        return float(np.nanmean(pc)) if np.isfinite(pc).any() else float("nan")


def relative_drops(r2: Sequence[float]) -> list[float]:
    """d_j = (R_{j-1}^2 - R_j^2) / R_{j-1}^2 for j = 1..n-1 (0 where R_{j-1}^2 is 0)."""
    r = [float(v) for v in r2]
    return [(a - b) / a if a > 0 else 0.0 for a, b in zip(r[:-1], r[1:])]


@dataclass
class Zone:
    """A zone over candidate positions ``start..end`` (0-based indices into the curve), entered by
    the drop ``drop`` = d_start."""

    start: int
    end: int
    drop: float


@dataclass
class ZoneResult:
    drops: list[float]
    primary: Zone
    second: Zone | None = None
    notes: list[str] = field(default_factory=list)


def _extent(drops: list[float], start: int, flat: float) -> int:
    """Last position of the flat stretch that follows the drop into ``start``."""
    end = start
    while end + 1 <= len(drops) and abs(drops[end]) < flat:  # drops[end] = d_{end+1}
        end += 1
    return end


def locate_zone(r2: Sequence[float], *, flat: float = FLAT) -> ZoneResult:
    """The Golden Partition Zone of an R_c^2 curve over cut candidates (see the module docstring)."""
    if len(r2) < 2:
        raise QdefendError(f"locate_zone needs R_c^2 at >= 2 cut candidates, got {len(r2)}; analyse a deeper model")
    if not all(np.isfinite(float(v)) for v in r2):
        raise QdefendError("locate_zone got a non-finite R_c^2 value; check the features (NaN in the model?)")
    if not 0 < flat < 1:
        raise QdefendError(f"flat={flat} must be in (0, 1), e.g. locate_zone(r2, flat=0.2)")
    d = relative_drops(r2)
    order = sorted(range(len(d)), key=lambda i: -d[i])
    j1 = order[0] + 1  # positions: drop d[i] leads into candidate i + 1
    notes = []
    if d[j1 - 1] <= 0:
        notes.append("R_c^2 never drops between candidates: no transition, the zone is a guess at the largest change")
    primary = Zone(j1, _extent(d, j1, flat), d[j1 - 1])
    second = None
    if len(order) > 1:
        j2 = order[1] + 1
        lo, hi = sorted((j1, j2))
        between = d[lo:hi - 1]  # d_{lo+1} .. d_{hi-1}
        if d[j2 - 1] >= flat and hi - lo >= 2 and all(abs(v) < flat for v in between):
            second = Zone(j2, _extent(d, j2, flat), d[j2 - 1])
    return ZoneResult(drops=d, primary=primary, second=second, notes=notes)
