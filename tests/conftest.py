"""Shared test fixtures."""

import os

import pytest
import torch

# in-process `qdefend.cli.main` re-raises a bug (not a user error) so the test shows its traceback
os.environ.setdefault("QDEFEND_TRACEBACK", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convs run fastest on one thread (no OpenMP hand-offs on a shared 2-core machine);
    modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_benchmark(name: str):
    """Import ``benchmarks/NAME.py`` as a module (registered in sys.modules while in use, as
    dataclasses look their module up there); a generator for module-scoped fixtures."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"qdefend_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def tiny_exported_run(root, images: int = 256, sigma: float | None = None, quant: dict | None = None, **train):
    """A tiny real QAT run (quarter-width VGG11-BN split, `images` Fashion-MNIST training images,
    1 epoch), exported with both int8 formats and verified on 32 test images; `sigma`: Gaussian
    release noise; `quant`: QuantConfig fields (e.g. {"wire_bits": 4}). About a minute on 2 cores.
    Returns root."""
    from qdefend.config import RunConfig
    from qdefend.export import export_run
    from qdefend.train import Trainer

    held_out = max(32, images // 4)
    cfg = {
        "data": {"limit_train": images, "limit_test": held_out, "val_size": held_out, "aux_size": held_out},
        "model": {"width": 0.25, "head_width": 0.125},
        "quant": {"scheme": "int8", **(quant or {})},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, **train},
    }
    if sigma is not None:
        cfg["defense"] = {"stack": "noise", "params": {"noise": {"sigma": sigma}}}
    Trainer(RunConfig.from_dict(cfg), root, progress=False).fit()
    export_run(root, verify_images=32)
    return root
