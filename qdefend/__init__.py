"""qdefend: quantization-aware edge deployment toolkit for private split inference.

Pipeline: data -> train (QAT int8 + defenses) -> export (ONNX / TFLite int8) -> devices,
and attacks on the exported artifacts. Heavy modules (torch, onnx, litert) are imported lazily
by the commands that need them, so ``import qdefend`` stays light.
"""

from .errors import QdefendError

__version__ = "0.1.0"
__all__ = ["QdefendError", "__version__"]
