"""Export stage of qdefend: a trained run -> verified int8 ONNX / TFLite artifacts + manifest.

Modules: ``onnx`` (torch -> ONNX, onnxruntime kernel report), ``tflite`` (torch -> fully int8
.tflite, dtype report), ``verify`` (static checks, parity and accuracy through the device
runtime), ``pipeline`` (:func:`export_run`, what ``qdefend export RUN`` calls). Names are loaded
on first use, so importing ``qdefend.export`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["export_run", "export_onnx", "export_tflite"]
_WHERE = {"export_run": ".pipeline", "export_onnx": ".onnx", "export_tflite": ".tflite"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
