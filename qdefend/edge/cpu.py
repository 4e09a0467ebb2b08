"""What this CPU can do for int8, and the ONNX Runtime int8 mode that follows from it.

ONNX Runtime's x86 int8 GEMM multiplies unsigned activations by signed weights (u8s8). Without
VNNI, AVX2 computes those products with ``vpmaddubsw``, which adds pairs of products into a
**saturating 16-bit** sum: large activations times large weights can clip (measured here on a Zen 1
EPYC: up to 160 LSB off at the encoder's output). ``session.x64quantprecision=1`` makes ORT use an
exact u8u8 path there, at about half the speed. With VNNI (``vpdpbusd``: the products go straight
into 32-bit sums), AMX, or on ARM (``sdot``/``udot``, or plain NEON widening multiplies) nothing
saturates, and the precise mode only costs time: measured on a Zen 4 EPYC with AVX-512 VNNI, 62 vs
125 GMAC/s and bit-identical encoder outputs on 2,000 test images.

So the mode is chosen from the CPU's flags: ``fast`` (ORT's default) where the int8 dot product is
exact, ``precise`` on x86 without VNNI or AMX. ``QDEFEND_ORT_INT8_PRECISION=fast|precise``
overrides it; export verification measures both modes against torch. Standard library only
(copied into device bundles).
"""

from __future__ import annotations

import os
import platform

__all__ = ["INT8_DOT_FLAGS", "MODES", "cpu_flags", "int8_dot_product", "ort_int8_precision", "ENV"]

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 flags of an exact int8 dot product
MODES = ("fast", "precise")
ENV = "QDEFEND_ORT_INT8_PRECISION"
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (x86 "flags", ARM "Features"); empty elsewhere."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return set()


def int8_dot_product(machine: str | None = None, flags: set[str] | None = None) -> tuple[bool, str]:
    """(exact int8 dot product without 16-bit saturation?, why)."""
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return True, f"{machine}: no u8s8 16-bit saturation (ARM sdot/udot or widening multiplies)"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in INT8_DOT_FLAGS if f in flags]
    if have:
        return True, f"x86 with {'/'.join(have)}: vpdpbusd sums into 32 bits"
    return False, "x86 without VNNI or AMX: AVX2 vpmaddubsw sums product pairs into saturating 16 bits"


def ort_int8_precision(requested: str = "auto", machine: str | None = None,
                       flags: set[str] | None = None) -> dict:
    """{"mode": fast|precise, "x64quantprecision": "1" or None, "source", "reason"} for ORT sessions.

    requested: "auto" (from $QDEFEND_ORT_INT8_PRECISION if set, else the CPU), "fast" or "precise"."""
    source = "argument"
    if requested == "auto" and os.environ.get(ENV):
        requested, source = os.environ[ENV].strip().lower(), f"${ENV}"
    if requested not in ("auto", *MODES):
        raise ValueError(f"ONNX Runtime int8 precision {requested!r} ({source}) must be auto, fast or precise")
    exact, why = int8_dot_product(machine, flags)
    if requested == "auto":
        mode, source = ("fast" if exact else "precise"), "cpu"
    else:
        mode = requested
    return {"mode": mode, "x64quantprecision": "1" if mode == "precise" else None, "source": source,
            "reason": why}
