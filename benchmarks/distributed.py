"""One training process against N: the step time of `qdefend train --nproc N` on this machine.

    python benchmarks/distributed.py [--images 6400] [--epochs 3] [--defense noise+cem] [--repeats 1]
                                     [--configs 1x1,1x2,2x1] [--out FILE]

Each configuration `PxT` (P processes, T torch threads each) trains the reference split (VGG11-BN,
QAT int8, the run config's defaults, global batch 128) on the first `--images` Fashion-MNIST
training images through the real CLI, `qdefend train --nproc P --threads T`, in a fresh run
directory. The step time is the epoch's training time (`train_time_s` in metrics.jsonl, which
leaves out the evaluation) over its steps, from epoch 2 on: epoch 1 is the warm-up, and CEM only
acts from epoch 2. Runs go round-robin over the configurations in a shuffled order, `--repeats`
times; medians and ratios against `1x1` are taken within this one run. JSON (with the machine's
CPU and load average) goes to benchmarks/results/distributed.json.

On a 2-core machine 2 processes of 1 thread compete with 1 process of 2 threads for the same two
cores: the ratio says what the process group costs or buys there, not how N machines scale.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "distributed.json"


def _configs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            p, t = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected PxT items such as 1x1,2x1, got {part!r}") from None
        if p < 1 or t < 1:
            raise argparse.ArgumentTypeError(f"{part}: processes and threads must be >= 1")
        out.append((p, t))
    return out


def run_once(procs: int, threads: int, args, root: Path) -> dict:
    """Train one configuration in a fresh run directory; its per-epoch step times and accuracies."""
    out = root / f"p{procs}t{threads}-{time.monotonic_ns()}"
    cfg = root / "bench.toml"
    cfg.write_text(f'[data]\nlimit_train = {args.images}\n[train]\nepochs = {args.epochs}\n'
                   f'[defense]\nstack = "{args.defense}"\n[defense.params.noise]\nsigma = 0.1\n')
    cmd = [sys.executable, "-m", "qdefend.cli", "train", "--config", str(cfg), "--out", str(out), "--quiet",
           "--threads", str(threads)]
    if procs > 1:
        cmd += ["--nproc", str(procs)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    epochs = [r for r in recs if r["event"] == "epoch"]
    test = [r for r in recs if r["event"] == "test"][-1]
    return {
        "processes": procs, "threads": threads, "wall_s": round(wall, 2),
        "step_ms": [1000 * r["train_time_s"] / r["steps"] for r in epochs[1:]],
        "val_acc_int8": epochs[-1].get("val_acc_int8"), "test_acc_int8": test.get("test_acc_int8"),
        "rank_spread": [r.get("rank_spread") for r in epochs], "rank_state_sha256": test.get("rank_state_sha256"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6400)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--defense", default="noise+cem")
    ap.add_argument("--configs", type=_configs, default=_configs("1x1,1x2,2x1"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (epoch 1 is the warm-up)")
    from qdefend.machine import machine_info

    rows: dict[str, list[dict]] = {f"{p}x{t}": [] for p, t in args.configs}
    order = [c for _ in range(args.repeats) for c in args.configs]
    random.Random(0).shuffle(order)
    with tempfile.TemporaryDirectory(prefix="qdefend-dist-bench-") as tmp:
        for i, (p, t) in enumerate(order):
            print(f"[{i + 1}/{len(order)}] {p} process(es) x {t} thread(s) ...", flush=True)
            rows[f"{p}x{t}"].append(run_once(p, t, args, Path(tmp)))
    summary = {}
    for key, runs in rows.items():
        steps = [s for r in runs for s in r["step_ms"]]
        summary[key] = {"step_ms_median": round(statistics.median(steps), 1),
                        "test_acc_int8": [r["test_acc_int8"] for r in runs],
                        "wall_s": [r["wall_s"] for r in runs]}
    base = summary.get("1x1", {}).get("step_ms_median")
    for key, s in summary.items():
        s["step_time_vs_1x1"] = round(s["step_ms_median"] / base, 3) if base else None
    result = {"benchmark": "distributed", "machine": machine_info(), "load_avg": list(os.getloadavg()),
              "settings": {"images": args.images, "epochs": args.epochs, "defense": args.defense,
                           "global_batch": 128, "repeats": args.repeats},
              "summary": summary, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'config':>7} {'step ms':>8} {'x 1x1':>6}  test acc int8")
    for key, s in summary.items():
        print(f"{key:>7} {s['step_ms_median']:8.1f} {s['step_time_vs_1x1'] or 0:6.2f}  {s['test_acc_int8']}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
