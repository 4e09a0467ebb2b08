"""What machine a measurement ran on: CPU model, the SIMD features that decide int8 speed, cores,
OS, package versions and the load average. Every benchmark records it with its figures, so times
from different machines are never compared by mistake (standard library only; torch's version and
the GPU, when asked, through an import inside)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from qdefend.edge.cpu import cpu_flags, ort_int8_precision

__all__ = ["machine_info", "load_average", "PACKAGES"]

PACKAGES = ("numpy", "torch", "torchao", "onnxruntime", "ai-edge-litert", "litert-torch", "qdefend")
# int8 GEMM speed: VNNI (Zen 4, Ice Lake+) runs int8 about 4x the float rate, AVX2 alone about 1x
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine_info(gpu: bool = False) -> dict[str, Any]:
    """CPU model, SIMD flags, cores, OS and package versions (and the CUDA device with ``gpu``)."""
    info: dict[str, str] = {}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():  # the first CPU's block
        key, _, val = line.partition(":")
        info.setdefault(key.strip(), val.strip())
    flags = cpu_flags(cpuinfo)
    out: dict[str, Any] = {
        "cpu": info.get("model name") or platform.processor() or "unknown",
        "cpu_family_model": [info.get("cpu family"), info.get("model")],  # AMD 23/1: Zen 1 (Naples)
        "flags": {f: f in flags for f in FLAGS},
        "ort_int8_precision": ort_int8_precision(),  # the mode qdefend's runtime picks here
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": {pkg: _version(pkg) for pkg in PACKAGES},
    }
    if gpu:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def load_average() -> list[float] | None:
    """The 1/5/15-minute load average (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
