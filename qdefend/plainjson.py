"""Values made plain for strict JSON: numpy scalars -> Python numbers, tuples -> lists, Paths ->
strings, NaN/inf -> None. Used for attack results (attacks/base.py) and analysis reports.
(The manifest, read on devices without numpy, has its own stricter writer that refuses NaN.)"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plain"]


def plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        raise TypeError("arrays do not belong in JSON results: convert them deliberately (e.g. .tolist()) "
                        "or keep them in an .npz")
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
