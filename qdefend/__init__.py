"""qdefend: quantization-aware edge deployment toolkit for private split inference.

Pipeline: data -> train (QAT int8 + defenses) -> export (ONNX / TFLite int8) -> devices,
and attacks on the exported artifacts. Heavy modules (torch, onnx, litert) are imported lazily
by the commands that need them, so ``import qdefend`` stays light.
"""

from .errors import QdefendError

__version__ = "0.1.0"
__all__ = ["QdefendError", "__version__"]


def _quiet_known_import_noise() -> None:
    """Drop two harmless log lines torchao/torch print on every import of a CPU build: the skipped
    CUDA .so notice and a pytree register_constant deprecation."""
    import logging

    noise = ("Skipping import of cpp extensions", "is an Enum subclass and is now natively supported")

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(n in str(record.msg) for n in noise)

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(_Drop())


_quiet_known_import_noise()
