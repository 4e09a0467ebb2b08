"""What training and attacks cost on this CPU: a QAT step against a float step, and the decoder
attacker's training throughput under its memory format, threads and batch size.

    python benchmarks/training.py [--batch 128] [--threads 1,2] [--repeats 15] [--malloc qdefend|glibc] [--out FILE]

QAT vs float: the reference split (VGG11-BN cut 2, the run config's defaults) built by qdefend's
own `build_run`, once with `quant.scheme = int8` (torchao pt2e fake-quant encoder) and once float,
each trained the way `qdefend train` trains (SGD with momentum, cross-entropy, channels_last when
the config says so, freed memory kept in the heap: qdefend.allocator) on real Fashion-MNIST
training images; a step is forward + backward + update. ``--malloc glibc`` measures the same with
the C library's allocator defaults.
Decoder: CEM's residual decoder (`res_normN8C64`, the default attacker) on features of the cut's
shape, MSE loss, Adam, forward + backward + update, images per second.

Timing as benchmarks/latency.py: warm-up, then samples round-robin over configurations in a
shuffled order (so load from other processes hits all alike), medians and p10/p90, ratios taken
within this one run. JSON output records the machine (CPU flags) and the load average.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "training.json"


def _ints(text: str) -> list[int]:
    vals = [int(v) for v in text.split(",") if v.strip()]
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(vals))


def split_step(scheme: str, batch: int, channels_last: bool | None = None):
    """(step function, description) of one training step of the reference split (channels_last:
    the config's default unless given)."""
    import torch
    import torch.nn.functional as F

    from qdefend.config import RunConfig
    from qdefend.run import build_run

    train = {} if channels_last is None else {"channels_last": channels_last}
    cfg = RunConfig.from_dict({"data": {"limit_train": max(batch * 4, 512), "limit_test": 64, "val_size": 64,
                                        "aux_size": 64}, "quant": {"scheme": scheme}, "train": train})
    run = build_run(cfg)
    net = run.net.train()
    if cfg.train.channels_last:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                          weight_decay=cfg.train.weight_decay)
    tr = run.data.train
    x = torch.from_numpy(run.data.normalization.apply(tr.floats(slice(0, batch))).astype(np.float32))
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(tr.labels[:batch].astype(np.int64))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return step, f"{cfg.model.name}, {scheme}, channels_last={cfg.train.channels_last}"


def decoder_step(batch: int, channels_last: bool, feature_shape=(8, 7, 7), image_shape=(1, 28, 28)):
    """One training step of the default decoder attacker (CEM's res_normN8C64)."""
    import torch
    import torch.nn.functional as F

    from qdefend.decoders import ResDecoder

    torch.manual_seed(0)
    net = ResDecoder(feature_shape, image_shape).train()
    z, x = torch.rand(batch, *feature_shape), torch.rand(batch, *image_shape)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        z, x = (t.contiguous(memory_format=torch.channels_last) for t in (z, x))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(net(z), x).backward()
        opt.step()
    return step


def measure(configs: dict, repeats: int, warmup: int, seed: int = 0) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds per step and the process's minor page faults per step (the allocator's cost: memory
    given back and faulted in again), `repeats` samples each, round-robin in a shuffled order per round."""
    import resource

    import torch

    rng = random.Random(seed)
    keys = list(configs)
    for k in keys:
        torch.set_num_threads(configs[k]["threads"])
        for _ in range(warmup):
            configs[k]["step"]()
    out: dict[str, list[float]] = {k: [] for k in keys}
    faults: dict[str, list[int]] = {k: [] for k in keys}
    for _ in range(repeats):
        rng.shuffle(keys)
        for k in keys:
            torch.set_num_threads(configs[k]["threads"])
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            configs[k]["step"]()
            out[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out, faults


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128, help="split training batch (the run config's default: 128)")
    ap.add_argument("--decoder-batches", type=_ints, default=[64, 256])
    ap.add_argument("--threads", type=_ints, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--malloc", choices=("qdefend", "glibc"), default="qdefend",
                    help="qdefend: keep freed memory in the heap as `qdefend train` and attacks do "
                         "(qdefend.allocator); glibc: the C library's defaults, to measure what that buys")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    import torch

    from qdefend.allocator import keep_freed_memory
    from qdefend.machine import load_average, machine_info

    allocator = keep_freed_memory() if a.malloc == "qdefend" else {"malloc": "glibc defaults"}

    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), load_average()
    configs: dict[str, dict] = {}
    for t in a.threads:
        for scheme in ("int8", "none"):
            step, what = split_step(scheme, a.batch)
            configs[f"split {scheme} t{t}"] = {"kind": "split", "scheme": scheme, "threads": t, "batch": a.batch,
                                               "step": step, "what": what}
        for b in a.decoder_batches:
            for cl in (True, False):
                configs[f"decoder b{b} cl{int(cl)} t{t}"] = {"kind": "decoder", "threads": t, "batch": b,
                                                             "channels_last": cl, "step": decoder_step(b, cl)}
    print(f"timing {len(configs)} configurations: {a.warmup} warm-up + {a.repeats} rounds", file=sys.stderr)
    samples, faults = measure(configs, a.repeats, a.warmup)
    rows = []
    for k, c in configs.items():
        s = np.asarray(samples[k])
        row = {key: v for key, v in c.items() if key != "step"}
        row.update(median_ms=round(float(np.median(s)) * 1e3, 3), p10_ms=round(float(np.percentile(s, 10)) * 1e3, 3),
                   p90_ms=round(float(np.percentile(s, 90)) * 1e3, 3),
                   samples_per_s=round(c["batch"] / float(np.median(s)), 1),
                   minor_faults_per_step=int(np.median(faults[k])))
        rows.append(row)
    med = {k: float(np.median(v)) for k, v in samples.items()}
    ratios = {"qat_step_vs_float_step": {f"threads={t}": round(med[f"split int8 t{t}"] / med[f"split none t{t}"], 3)
                                         for t in a.threads},
              "decoder_channels_last_speedup": {f"batch={b} threads={t}": round(
                  med[f"decoder b{b} cl0 t{t}"] / med[f"decoder b{b} cl1 t{t}"], 3)
                  for b in a.decoder_batches for t in a.threads}}
    ratios["qat_goal"] = {"target": "QAT step <= 1.5x the float step",
                          "met": all(v <= 1.5 for v in ratios["qat_step_vs_float_step"].values())}
    res = {"benchmark": "qdefend.training", "started": started,
           "command": " ".join(["python", "benchmarks/training.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": machine_info(), "torch_threads_default": torch.get_num_threads(),
           "load_average": {"start": load_start, "end": load_average()},
           "settings": {"repeats": a.repeats, "warmup": a.warmup, "order": "round-robin, shuffled per round",
                        "allocator": allocator},
           "results": rows, "ratios": ratios}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    for r in rows:
        print(f"{r['kind']:8s} {r.get('scheme', ''):5s} batch {r['batch']:4d} threads {r['threads']} "
              f"cl {r.get('channels_last', '')!s:5s} {r['median_ms']:9.2f} ms  {r['samples_per_s']:8.1f}/s  "
              f"{r['minor_faults_per_step']:6d} faults/step")
    print(json.dumps(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
