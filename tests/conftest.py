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
