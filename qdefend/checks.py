"""Validation helpers: the one way qdefend checks a value a user gave it.

Every config (run, defense, attack, analysis) validates its fields with these in ``__post_init__``;
each failure is one line naming the full key, what it must be, what it got and the command-line
fix, e.g. ``defense.params.noise.sigma must be a number >= 0, got -1.0: e.g. --set
defense.params.noise.sigma=0.1``. (The device code in :mod:`qdefend.edge` validates manifests with
its own key-naming helper, since it may import nothing else of qdefend.)
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .errors import QdefendError

__all__ = ["check_number", "check_choice", "require", "fix_hint"]


def fix_hint(key: str, example: Any = None, fix: str | None = None) -> str:
    """': e.g. FIX', else ': e.g. --set KEY=EXAMPLE' for a plain finite scalar example, else ''."""
    if fix is not None:
        return f": e.g. {fix}"
    if isinstance(example, bool):
        return f": e.g. --set {key}={str(example).lower()}"
    if isinstance(example, str) or (isinstance(example, (int, float)) and math.isfinite(example)):
        return f": e.g. --set {key}={example}"
    return ""


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"


def check_number(v: Any, key: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False, example: Any = None, fix: str | None = None,
                 error: type[QdefendError] = QdefendError):
    """``v`` if it is a finite number (an integer with ``integer``) within the bounds (``lo_open``:
    ``v > lo`` instead of ``v >= lo``), else ``error`` naming ``key`` and the fix (``fix``, else
    ``--set key=example``). An integral float comes back as an int with ``integer``."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (not integer or float(v).is_integer())
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise error(f"{key} must be {kind} {_bounds(lo, hi, lo_open, hi_open)}, got {v!r}{fix_hint(key, example, fix)}")
    return int(v) if integer else v


def check_choice(v: Any, key: str, choices: Iterable[str], *, fix: str | None = None,
                 error: type[QdefendError] = QdefendError):
    """``v`` if it is one of ``choices``, else ``error`` listing them (fix: the first one)."""
    choices = tuple(choices)
    if v not in choices:
        raise error(f"{key} must be one of {', '.join(choices)}, got {v!r}{fix_hint(key, choices[0], fix)}")
    return v


def require(ok: bool, message: str, error: type[QdefendError] = QdefendError) -> None:
    """Raise ``error(message)`` unless ``ok``: for the checks that are not a range or a choice (the
    message still says what to do)."""
    if not ok:
        raise error(message)
