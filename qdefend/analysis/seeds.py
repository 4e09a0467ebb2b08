"""Results over training seeds: one mean ± sample standard deviation per group, and its cell text.

A benchmark that repeats a configuration with several seeds reports each number as the mean over
the seeds with its sample standard deviation (n - 1 in the denominator), the usual way results
are reported over a few seeds in this field. A value missing (or not a finite number) for any seed
of a group is left out of that group rather than averaged over the seeds that have it: a mean over
a different set of seeds would not be comparable with its neighbours in a table.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

__all__ = ["aggregate_seeds", "mean_pm"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate_seeds(rows: Iterable[dict], by: Sequence[str], keys: Iterable[str] | None = None,
                    seed_key: str = "seed") -> list[dict[str, Any]]:
    """One dict per distinct ``by`` tuple of ``rows`` (in first-seen order) with the ``by`` fields,
    ``seeds`` (the group's ``seed_key`` values, 0 where absent), and for each key that is a finite
    number in every row of the group: ``KEY`` (the mean) and ``KEY_std`` (the sample standard
    deviation; None with one seed). ``keys`` defaults to every field of the group's first row but
    ``by`` and ``seed_key``; a key not finite everywhere in the group is absent from its dict.

    >>> aggregate_seeds([{"c": "a", "seed": 0, "x": 1.0}, {"c": "a", "seed": 1, "x": 3.0}], by=["c"])
    [{'c': 'a', 'seeds': [0, 1], 'x': 2.0, 'x_std': 1.4142135623730951}]
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out = []
    for group, rs in groups.items():
        agg: dict[str, Any] = {**dict(zip(by, group)), "seeds": [r.get(seed_key, 0) for r in rs]}
        names = list(keys) if keys is not None else [k for k in rs[0] if k not in by and k != seed_key]
        for k in names:
            vals = [r.get(k) for r in rs]
            if all(_finite(v) for v in vals):
                agg[k] = statistics.fmean(vals)
                agg[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def mean_pm(agg: dict, key: str, spec: str, scale: float = 1.0) -> str:
    """The table cell for ``agg[key]``: ``format(scale * mean, spec)``, then `` ± std`` when the
    group had more than one seed, or "-" when the key is missing.

    >>> mean_pm({"acc": 0.87, "acc_std": 0.0141}, "acc", ".2f", 100)
    '87.00 ± 1.41'
    """
    if agg.get(key) is None:
        return "-"
    std = agg.get(f"{key}_std")
    return format(scale * agg[key], spec) + ("" if std is None else f" ± {format(scale * std, spec)}")
