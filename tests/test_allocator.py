"""qdefend.allocator: glibc keeps freed tensor memory for the next step (training/attack processes)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from qdefend.allocator import keep_freed_memory
    state = keep_freed_memory() if sys.argv[1] == "keep" else {}
    if sys.argv[1] == "keep":
        assert keep_freed_memory() == state  # applied once per process

    class MallInfo2(ctypes.Structure):  # glibc >= 2.33; sums over all arenas
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except AttributeError:
        print(json.dumps({"state": state, "mallinfo2": False}))
        sys.exit(0)
    mallinfo2.restype = MallInfo2
    mib = lambda m: {f: getattr(m, f) >> 20 for f in ("arena", "hblkhd", "fordblks")}
    before = mib(mallinfo2())
    x = torch.ones(256, 64, 28, 28)  # two 49 MiB blocks (a 256x64x28x28 map and its twin), as a training step makes them
    y = x * 2
    live = mib(mallinfo2())
    del x, y
    print(json.dumps({"state": state, "mallinfo2": True, "before": before, "live": live, "freed": mib(mallinfo2())}))
""")


def _run(mode, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True, timeout=120, env=e)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_large_blocks_stay_in_the_heap_after_free():
    """glibc serves a 49 MiB block with mmap and unmaps it on free (above its 32 MiB ceiling for the
    adaptive threshold); kept, the block comes from the heap and stays there, free, for the next
    step. What that saves in page faults and time depends on the kernel and is measured by
    benchmarks/training.py (faults per step and step times, --malloc glibc for the defaults)."""
    default, kept = _run("default"), _run("keep")
    if kept["state"]["malloc"].startswith("unchanged") or not kept["mallinfo2"]:
        pytest.skip(f"no glibc mallopt/mallinfo2 here: {kept}")
    assert kept["state"]["malloc"].startswith("glibc mmap_max=0")
    # defaults: the two live blocks are mmapped, and given back on free
    assert default["live"]["hblkhd"] - default["before"]["hblkhd"] >= 90, default
    assert default["freed"]["hblkhd"] - default["before"]["hblkhd"] < 50, default
    # kept: no mmapped block; the heap holds them, and after free keeps them as free heap memory
    assert kept["live"]["hblkhd"] - kept["before"]["hblkhd"] < 50, kept
    assert kept["freed"]["arena"] - kept["before"]["arena"] >= 90, kept
    assert kept["freed"]["fordblks"] >= 90, kept


def test_a_users_malloc_variables_are_left_alone():
    got = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert got["state"]["malloc"].startswith("unchanged")
