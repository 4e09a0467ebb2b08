"""qdefend.allocator: glibc keeps freed tensor memory for the next step (training/attack processes)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from qdefend.allocator import keep_freed_memory
    state = keep_freed_memory() if sys.argv[1] == "keep" else {}
    assert keep_freed_memory() == state or sys.argv[1] != "keep"  # once per process
    def step():  # allocate and free a 51 MiB activation and its gradient-sized twin, like a step
        x = torch.ones(256, 64, 28, 28)
        return float((x * 2).sum())
    for _ in range(8):
        step()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(json.dumps({"state": state, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5}))
""")


def _run(mode, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True, timeout=120, env=e)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_kept_memory_takes_no_page_faults_after_the_warm_up():
    """Kept in the heap, a step after the warm-up re-uses its 51 MiB blocks: (almost) no page
    faults. With glibc's defaults such blocks are mmapped afresh and faulted in again on many
    machines (thousands of faults a step here), but not on all (kernel huge pages, glibc's
    adaptive threshold), so only the kept side is asserted."""
    default, kept = _run("default"), _run("keep")
    if kept["state"]["malloc"].startswith("unchanged"):
        pytest.skip(f"no glibc mallopt here: {kept['state']}")
    assert kept["state"]["malloc"].startswith("glibc mmap_max=0")
    assert kept["faults"] <= min(50, default["faults"] + 50), (kept, default)


def test_a_users_malloc_variables_are_left_alone():
    got = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert got["state"]["malloc"].startswith("unchanged")
