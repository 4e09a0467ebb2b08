"""Keep freed tensor memory in the process between training steps (glibc malloc settings).

A CPU training step allocates and frees the same large activations every step (25 MiB for one
128x64x28x28 float map, 51 MiB at batch 256). glibc serves blocks that large with mmap and gives
them back with munmap on free, so the next step takes a page fault for every 4 KiB of them again,
each zero-filled by the kernel. Measured on one Zen 4 core (``benchmarks/training.py``): a QAT step
of the reference split, whose fake-quant and conv-BN ops allocate several such maps, and the
decoder attacker at batch 256 ran 1.3-1.4x slower for it; a float step, which reuses its blocks
within glibc's adaptive threshold, did not. Turning mmap off for allocations (``M_MMAP_MAX`` 0)
and raising the trim threshold keeps the blocks in the heap for the next step, the effect
PyTorch's CPU performance guide gets from jemalloc/tcmalloc. It costs resident memory up to the
peak of a step, which a training process holds anyway; only training and attack processes call it.

Only glibc on Linux has ``mallopt``; elsewhere (macOS, musl) this does nothing. A user who sets
glibc's own MALLOC_MMAP_MAX_ / MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ keeps their values.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "TRIM_THRESHOLD"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h
TRIM_THRESHOLD = 2**30  # free heap top above this is still given back
_state: dict[str, str] = {}


def keep_freed_memory() -> dict[str, str]:
    """Apply the settings once per process; returns what was done (benchmarks record it)."""
    if _state:
        return dict(_state)
    if not sys.platform.startswith("linux"):
        _state["malloc"] = "unchanged (not Linux)"
    elif any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        _state["malloc"] = "unchanged (MALLOC_* set by the user)"
    else:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            _state["malloc"] = "unchanged (no glibc mallopt)"
        else:
            ok = (mallopt(_M_MMAP_MAX, 0) == 1) & (mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
            _state["malloc"] = f"glibc mmap_max=0 trim_threshold={TRIM_THRESHOLD}" if ok else "unchanged (mallopt refused)"
    return dict(_state)
