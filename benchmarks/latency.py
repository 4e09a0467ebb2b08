"""Encoder latency on this CPU: int8 vs float for ONNX Runtime and LiteRT, and torch eager float.

    python benchmarks/latency.py RUN_DIR [--batches 1,64] [--threads 1,2] [--repeats N]
                                 [--warmup N] [--out FILE] [--ort-default] [--profile]

RUN_DIR is an exported run (``qdefend export RUN``). Every artifact is timed through
``qdefend.edge.runtime.Runtime.open(...).run(x)``, what a device runs (for ONNX Runtime that
includes the int8 mode the runtime picks from this CPU: ``session.x64quantprecision=1``, exact on
x86 without VNNI, or ORT's fast default where VNNI/AMX/ARM make it exact; ``--ort-default`` also
times the other mode, recorded as ``onnxruntime-precise`` / ``onnxruntime-fast``). The run has
no float .tflite, so one is exported here from the run's float twin into a temporary directory
with a one-artifact manifest, so LiteRT float goes through the same Runtime code (verification,
batch resize, set_tensor/invoke) as LiteRT int8. The torch baseline is the same float twin in
eager mode (eval, no_grad, ``torch.set_num_threads(threads)``): what a user would run without
qdefend. Inputs are the first images of the run's test split, normalised as the encoder expects.

Timing: every configuration is warmed up, then sampled with ``time.perf_counter`` round-robin
(one sample of each configuration per round, in a shuffled order), so CPU contention from other
processes hits every configuration alike; a sample follows one untimed call (the steady state,
not the cache misses the previous configuration left) and averages enough back-to-back calls to
last >= 5 ms. Medians with p10/p90 are reported, and ratios are taken within this one run. Output: a
JSON file (machine, load average at start and end, per-configuration stats, int8-vs-float and
vs-torch ratios, the goals) and a printed table. ``--profile`` adds ONNX Runtime per-node times
(int8 and float, largest batch, 1 thread, the runtime's int8 mode), its GEMM kernels on this CPU
(MatMulInteger in both modes, float MatMul), and each engine's int8 GEMM peak per thread count (ORT
MatMulInteger in the runtime's mode, LiteRT's int8 fully-connected), timed in the same rounds as
the encoder, with the encoder's effective GMAC/s as a share of its own engine's peak: where the
time goes, against the physical limit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

GOAL = 2.0  # the first int8 issue: int8 at least 2x faster than float at the largest batch, per engine
GOAL_VNNI = 3.0  # with an exact int8 dot product (VNNI / AMX / ARM dot-product): 3x, per engine
PEAK_GOAL = {"litert": 0.80, "onnxruntime": 0.70}  # share of the engine's own int8 GEMM peak
MIN_SAMPLE_S = 0.005  # a sample lasts at least this long (several calls at batch 1)
# ORT sessions with > 1 thread spin while idle: with every configuration alive at once (round-robin
# timing) the idle pools took the timed one's CPU on 2 cores, so they do not spin here
NO_SPIN = {"session.intra_op.allow_spinning": "0"}
ORT_DEFAULT = "onnxruntime-default"  # older result files: ORT's default (fast) mode
ORT_DEFAULT_NOTE = "the int8 mode the runtime did not pick on this CPU (edge/cpu.py)"


@dataclass
class Config:
    """One timed configuration: `call` runs one batch; `before` runs before each sample."""

    engine: str
    precision: str
    batch: int
    threads: int
    call: Callable[[], object]
    before: Callable[[], None] = lambda: None
    note: str = ""
    number: int = 1  # calls per sample, set during warm-up

    @property
    def key(self) -> tuple:
        return self.engine, self.precision, self.batch, self.threads


# ----------------------------------------------------------------------------------- engines


def float_tflite(run, example, root: Path) -> Path:
    """root/ with artifacts/encoder.float.tflite (the float twin, dynamic batch) and a manifest
    holding only that artifact (the run's manifest otherwise), so Runtime.open can load it."""
    from qdefend.edge.manifest import artifact_entry, load_manifest, write_manifest
    from qdefend.export.pipeline import float_twin
    from qdefend.export.tflite import export_tflite

    name = "encoder.float.tflite"
    rep = export_tflite(float_twin(run, "encoder"), example, root / "artifacts" / name, int8=False)
    manifest = load_manifest(run.paths.root)
    manifest["artifacts"] = {name: artifact_entry(root, f"artifacts/{name}", format="tflite", role="encoder",
                                                  precision="float", input=rep["input"], output=rep["output"],
                                                  source="float twin (benchmark)")}
    manifest["verification"] = {"status": "benchmark only"}
    write_manifest(root, manifest)
    return root


def build_configs(run_dir: Path, run, x: np.ndarray, batches: list[int], threads: list[int],
                  tflite_root: Path, ort_default: bool) -> list[Config]:
    """Every (engine, precision, batch, threads) configuration, each with its own interpreter."""
    import torch

    from qdefend.edge.cpu import ort_int8_precision
    from qdefend.edge.runtime import Runtime
    from qdefend.export.pipeline import float_twin

    enc = float_twin(run, "encoder").eval()
    artifacts = [("onnxruntime", "int8", run_dir, "encoder.int8.onnx"),
                 ("onnxruntime", "float", run_dir, "encoder.float.onnx"),
                 ("litert", "int8", run_dir, "encoder.int8.tflite"),
                 ("litert", "float", tflite_root, "encoder.float.tflite")]
    configs = []
    for b in batches:
        xb = np.ascontiguousarray(x[:b])
        xt = torch.from_numpy(xb)
        for t in threads:
            for engine, prec, root, name in artifacts:
                rt = Runtime.open(root, name, interpreter=engine, threads=t,
                                  ort_config=NO_SPIN if engine == "onnxruntime" and t > 1 else None)
                configs.append(Config(engine, prec, b, t, lambda rt=rt, xb=xb: rt.run(xb)))
            if ort_default:
                other = "fast" if ort_int8_precision()["mode"] == "precise" else "precise"
                rt = Runtime.open(run_dir, "encoder.int8.onnx", interpreter="onnxruntime", threads=t,
                                  int8_precision=other, ort_config=NO_SPIN if t > 1 else None)
                configs.append(Config(f"onnxruntime-{other}", "int8", b, t, lambda rt=rt, xb=xb: rt.run(xb),
                                      note=ORT_DEFAULT_NOTE))

            def eager(xt=xt):
                with torch.no_grad():
                    return enc(xt)
            configs.append(Config("torch-eager", "float", b, t, eager,
                                  before=lambda t=t: torch.set_num_threads(t)))
    return configs


def _ort_session(model: Path | bytes, threads: int, *, x64quantprecision: str | None = "1",
                 profile: str | None = None, config: dict[str, str] | None = None):
    """An onnxruntime session as the device runtime makes it (optionally without its precision
    setting, or profiling into `profile`*.json), with session `config` entries."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    if x64quantprecision is not None:
        so.add_session_config_entry("session.x64quantprecision", x64quantprecision)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if profile:
        so.enable_profiling, so.profile_file_prefix = True, profile
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------- timing


def _sample(c: Config) -> float:
    """Seconds per call, averaged over c.number back-to-back calls after one untimed call: a
    sample times the steady state (this configuration's weights and buffers in cache), not the
    misses the previous configuration of the round left behind."""
    c.before()
    c.call()
    t0 = time.perf_counter()
    for _ in range(c.number):
        c.call()
    return (time.perf_counter() - t0) / c.number


def measure(configs: list[Config], repeats: int, warmup: int, seed: int = 0,
            say: Callable[[str], None] = print) -> dict[tuple, list[float]]:
    """Per-call seconds, `repeats` samples per config, taken round-robin in a shuffled order."""
    for c in configs:  # first call (allocation, resize), then calls per sample from its time
        c.before()
        c.call()
        c.number = max(1, int(np.ceil(MIN_SAMPLE_S / max(_sample(c), 1e-9))))
    order, rng = list(configs), random.Random(seed)
    samples: dict[tuple, list[float]] = {c.key: [] for c in configs}
    for r in range(warmup + repeats):
        rng.shuffle(order)
        for c in order:
            s = _sample(c)
            if r >= warmup:
                samples[c.key].append(s)
        if r == warmup - 1 or (r >= warmup and (r - warmup + 1) % 10 == 0):
            say(f"  round {r + 1}/{warmup + repeats}")
    return samples


def summarise(configs: list[Config], samples: dict[tuple, list[float]]) -> list[dict]:
    rows = []
    for c in configs:
        ms = np.asarray(samples[c.key]) * 1e3
        p10, med, p90 = np.percentile(ms, [10, 50, 90])
        row = {"engine": c.engine, "precision": c.precision, "batch": c.batch, "threads": c.threads,
               "median_ms": round(float(med), 4), "p10_ms": round(float(p10), 4),
               "p90_ms": round(float(p90), 4), "min_ms": round(float(ms.min()), 4),
               "repeats": len(ms), "calls_per_sample": c.number,
               "per_image_us": round(float(med) * 1e3 / c.batch, 2)}
        if c.note:
            row["note"] = c.note
        rows.append(row)
    return rows


def ratios(rows: list[dict], samples: dict[tuple, list[float]] | None = None, goal_x: float = GOAL) -> dict:
    """int8 speedup (float median / int8 median) per engine, batch, threads; speedup of every
    config over torch eager float at the same batch and threads; the 2x goal at the largest batch.

    With `samples` (aligned by round), also the median over rounds of float/int8 within a round:
    samples taken moments apart share the machine's load, so this one drifts less with it."""
    med = {(r["engine"], r["precision"], r["batch"], r["threads"]): r["median_ms"] for r in rows}
    int8 = []
    for (engine, prec, b, t), ms in med.items():
        fkey = ("onnxruntime" if engine.startswith("onnxruntime-") else engine, "float", b, t)
        if prec == "int8" and fkey in med:
            row = {"engine": engine, "batch": b, "threads": t, "int8_ms": ms, "float_ms": med[fkey],
                   "int8_speedup": round(med[fkey] / ms, 3)}
            if samples is not None:
                pairs = np.asarray(samples[fkey]) / np.asarray(samples[(engine, prec, b, t)])
                row["int8_speedup_paired"] = round(float(np.median(pairs)), 3)
            int8.append(row)
    torch_ = [{"engine": e, "precision": p, "batch": b, "threads": t,
               "speedup_vs_torch_eager": round(med[("torch-eager", "float", b, t)] / ms, 3)}
              for (e, p, b, t), ms in med.items()
              if e != "torch-eager" and ("torch-eager", "float", b, t) in med]
    top = max(r["batch"] for r in rows)
    goal = {"target_int8_speedup": goal_x, "batch": top, "per_engine": {}}
    for e in ("onnxruntime", "litert"):
        got = {f"threads={r['threads']}": r["int8_speedup"] for r in int8 if r["engine"] == e and r["batch"] == top}
        if got:
            goal["per_engine"][e] = {"speedup": got, "met": all(v >= goal_x for v in got.values())}
    goal["met"] = bool(goal["per_engine"]) and all(v["met"] for v in goal["per_engine"].values())
    return {"int8_vs_float": int8, "vs_torch_eager": torch_, "goal": goal}


# ----------------------------------------------------------------------------------- profile


def _chosen_x64() -> str | None:
    from qdefend.edge.cpu import ort_int8_precision

    return ort_int8_precision()["x64quantprecision"]


def ort_node_profile(path: Path, x: np.ndarray, runs: int = 10) -> list[dict]:
    """Median time per graph node of one onnxruntime session (1 thread) over `runs` calls."""
    prefix = tempfile.mkdtemp(prefix="qdefend-ortprof-")
    sess = _ort_session(path, 1, profile=os.path.join(prefix, "p"), x64quantprecision=_chosen_x64())
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(runs + 2):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    shutil.rmtree(prefix, ignore_errors=True)
    times: dict[tuple, list[int]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            times.setdefault((e["name"][:-len("_kernel_time")], e["args"]["op_name"]), []).append(e["dur"])
    nodes = [{"node": n, "op": op, "median_ms": round(float(np.median(v[2:] or v)) / 1e3, 3)}
             for (n, op), v in times.items()]
    total = sum(n["median_ms"] for n in nodes) or 1.0
    for n in nodes:
        n["share"] = round(n["median_ms"] / total, 3)
    return sorted(nodes, key=lambda n: -n["median_ms"])


GEMM_MKN = (12544, 576, 128)  # the 64->128 3x3 conv on 14x14 at batch 64 as an im2col GEMM
PEAK = "-gemm-peak"  # engine suffix of the peak configurations timed among the encoder's


def _gemm_blob(kind: str, m: int, k: int, n: int, rng) -> tuple[bytes, np.ndarray]:
    """An onnx MatMul (float32) or MatMulInteger (u8s8, u8u8) model with a constant weight, and its input."""
    from onnx import TensorProto as T
    from onnx import helper as h

    fl = kind == "float32"
    a = rng.random((m, k), dtype=np.float32) if fl else rng.integers(0, 256, (m, k), dtype=np.uint8)
    wtype, w = {"float32": (T.FLOAT, rng.random((k, n), dtype=np.float32)),
                "u8s8": (T.INT8, rng.integers(-128, 128, (k, n), dtype=np.int8)),
                "u8u8": (T.UINT8, rng.integers(0, 256, (k, n), dtype=np.uint8))}[kind]
    g = h.make_graph([h.make_node("MatMul" if fl else "MatMulInteger", ["a", "w"], ["y"])], "gemm",
                     [h.make_tensor_value_info("a", T.FLOAT if fl else T.UINT8, [m, k])],
                     [h.make_tensor_value_info("y", T.FLOAT if fl else T.INT32, [m, n])],
                     [h.make_tensor("w", wtype, [k, n], w.tobytes(), raw=True)])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=9).SerializeToString(), a


def gemm_throughput(m: int = GEMM_MKN[0], k: int = GEMM_MKN[1], n: int = GEMM_MKN[2], repeats: int = 30,
                    threads: int = 1) -> dict:
    """GMAC/s of onnxruntime (`threads`) for float MatMul and uint8 x int8 / uint8 x uint8
    MatMulInteger (with x64quantprecision 1 and the default), one session at a time, median: how
    the kernels compare on this CPU. (The peak the encoder is divided by is timed among the
    encoder's own configurations: :func:`peak_configs`.)"""
    rng = np.random.default_rng(0)
    secs: dict[str, list[float]] = {}
    for kind in ("float32", "u8s8", "u8u8"):
        blob, a = _gemm_blob(kind, m, k, n, rng)
        for prec in ("1",) if kind == "float32" else ("1", "default"):
            key = kind if kind == "float32" else f"{kind} (x64quantprecision={prec})"
            # one session at a time: idle ORT pools spin, and with several alive at 2 threads on
            # 2 cores they took each other's CPU (the 2-thread peak measured below 1 thread's)
            s = _ort_session(blob, threads, x64quantprecision=None if prec == "default" else prec)
            for _ in range(3):  # warm-up: packing, thread pool, clock ramp
                s.run(None, {"a": a})
            secs[key] = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                s.run(None, {"a": a})
                secs[key].append(time.perf_counter() - t0)
            del s
    return {"shape_mkn": [m, k, n], "threads": threads,
            "gmac_per_s": {key: round(m * k * n / float(np.median(v)) / 1e9, 2) for key, v in secs.items()}}


def _litert_fc(root: Path, k: int, n: int) -> Path:
    """A one-layer Linear(k, n), quantised (pt2e, as the encoder) and exported to an int8 .tflite
    by qdefend's own exporter: LiteRT runs it as an int8 FULLY_CONNECTED (XNNPACK)."""
    import torch

    from qdefend import quant
    from qdefend.export.tflite import export_tflite

    torch.manual_seed(0)
    x = torch.randn(256, k)
    prepared = quant.prepare_ptq(torch.nn.Sequential(torch.nn.Linear(k, n)).eval(), x[:2])
    quant.calibrate(prepared, [x])
    path = root / "gemm.int8.tflite"
    export_tflite(prepared, x[:2], path)
    return path


def peak_configs(root: Path, threads: list[int], mkn: tuple[int, int, int] = GEMM_MKN) -> list[Config]:
    """Each engine's int8 GEMM on the encoder's main shape, as configurations timed round-robin
    with the encoder's: ORT MatMulInteger u8s8 in the runtime's int8 mode (sessions with more than
    one thread do not spin, as the encoder's), and LiteRT's int8 FULLY_CONNECTED. Peak and encoder
    samples of one round are taken moments apart, so their ratio does not move with the machine's
    state between rounds or runs."""
    from ai_edge_litert.interpreter import Interpreter

    m, k, n = mkn
    rng = np.random.default_rng(0)
    blob, a = _gemm_blob("u8s8", m, k, n, rng)
    fc = _litert_fc(root, k, n)
    a8 = rng.integers(-128, 128, (m, k), dtype=np.int8)
    configs = []
    for t in threads:
        s = _ort_session(blob, t, x64quantprecision=_chosen_x64(), config=NO_SPIN if t > 1 else None)
        configs.append(Config("onnxruntime" + PEAK, "int8", m, t, lambda s=s: s.run(None, {"a": a})))
        it = Interpreter(model_path=str(fc), num_threads=t)
        d = it.get_input_details()[0]
        it.resize_tensor_input(d["index"], [m, k])
        it.allocate_tensors()
        it.set_tensor(d["index"], a8)
        configs.append(Config("litert" + PEAK, "int8", m, t, it.invoke))
    return configs


def efficiency(rows: list[dict], samples: dict[tuple, list[float]], macs_per_image: int,
               mkn: tuple[int, int, int] = GEMM_MKN) -> list[dict]:
    """The int8 encoder's effective GMAC/s per engine, batch and threads, as a share of the same
    engine's int8 GEMM peak at the same thread count, both timed in the same rounds
    (:func:`peak_configs`): `share_of_peak` is the median over rounds of the two samples' ratio;
    `peak_gmac_per_s` the peak's median; `share_of_best_peak` the encoder's median against the
    peak's best sample, a conservative bound (the big GEMM's samples spread more than the encoder's)."""
    gemm_macs = float(np.prod(mkn))
    out = []
    for r in rows:
        peak_key = (r["engine"] + PEAK, "int8", mkn[0], r["threads"])
        if r["precision"] != "int8" or peak_key not in samples:
            continue
        enc = np.asarray(samples[(r["engine"], "int8", r["batch"], r["threads"])])
        peak = np.asarray(samples[peak_key])
        g = macs_per_image * r["batch"] / enc / 1e9
        p = gemm_macs / peak / 1e9
        share = float(np.median(g / p))
        out.append({"engine": r["engine"], "batch": r["batch"], "threads": r["threads"],
                    "encoder_gmac_per_s": round(float(np.median(g)), 1),
                    "peak_gmac_per_s": round(float(np.median(p)), 1),
                    "peak_p10_p90": [round(float(v), 1) for v in np.percentile(p, [10, 90])],
                    "peak_best_gmac_per_s": round(float(p.max()), 1),
                    "share_of_peak": round(share, 3), "share_of_best_peak": round(float(np.median(g) / p.max()), 3),
                    "goal": PEAK_GOAL[r["engine"]],
                    "met": share >= PEAK_GOAL[r["engine"]]})
    return out


# ----------------------------------------------------------------------------------- report


def table(rows: list[dict], rat: dict) -> str:
    """The medians and ratios as aligned text."""
    sp = {(r["engine"], r["batch"], r["threads"]): r for r in rat["int8_vs_float"]}
    vt = {(r["engine"], r["precision"], r["batch"], r["threads"]): r["speedup_vs_torch_eager"]
          for r in rat["vs_torch_eager"]}
    head = (f"{'engine':20s} {'prec':5s} {'batch':>5s} {'thr':>3s} {'median ms':>10s} {'p10':>9s} "
            f"{'p90':>9s} {'us/img':>9s} {'int8 x':>7s} {'paired':>7s} {'vs torch':>8s}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["batch"], r["threads"], r["engine"], r["precision"])):
        k = (r["engine"], r["batch"], r["threads"])
        s = sp.get(k, {}) if r["precision"] == "int8" else {}
        x, xp = s.get("int8_speedup"), s.get("int8_speedup_paired")
        v = vt.get((r["engine"], r["precision"], r["batch"], r["threads"]))
        lines.append(f"{r['engine']:20s} {r['precision']:5s} {r['batch']:5d} {r['threads']:3d} "
                     f"{r['median_ms']:10.3f} {r['p10_ms']:9.3f} {r['p90_ms']:9.3f} {r['per_image_us']:9.1f} "
                     f"{'' if x is None else f'{x:.2f}':>7s} {'' if xp is None else f'{xp:.2f}':>7s} "
                     f"{'' if v is None else f'{v:.2f}':>8s}")
    g = rat["goal"]
    lines.append(f"goal int8 >= {g['target_int8_speedup']}x float at batch {g['batch']}: "
                 + ", ".join(f"{e} {v['speedup']} {'met' if v['met'] else 'MISSED'}"
                             for e, v in g["per_engine"].items()))
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,64, got {text!r}")
    return sorted(set(vals))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="an exported run (qdefend export RUN)")
    p.add_argument("--batches", type=_ints, default=[1, 64], help="comma-separated (default 1,64)")
    p.add_argument("--threads", type=_ints, default=[1, 2], help="comma-separated (default 1,2)")
    p.add_argument("--repeats", type=int, default=25, help="timed samples per configuration (default 25)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency.json")
    p.add_argument("--ort-default", action="store_true",
                   help=f"also time int8 ONNX with ORT's default precision ({ORT_DEFAULT_NOTE})")
    p.add_argument("--profile", action="store_true",
                   help="add ONNX Runtime per-node times and this CPU's float/int8 GEMM throughput")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from qdefend.edge.cpu import int8_dot_product, ort_int8_precision
    from qdefend.edge.manifest import ArtifactError, load_manifest
    from qdefend.errors import QdefendError
    from qdefend.machine import load_average, machine_info
    from qdefend.run import load_run

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    started, load_start = time.strftime("%Y-%m-%dT%H:%M:%S%z"), load_average()
    torch.set_num_threads(max(args.threads))
    tmp = Path(tempfile.mkdtemp(prefix="qdefend-bench-"))
    try:
        say(f"loading {args.run_dir}")
        run = load_run(args.run_dir)
        n = max(args.batches)
        test = run.data.test
        x = run.data.normalization.apply(test.floats(slice(0, min(n, len(test))))).astype(np.float32)
        x = np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])))  # repeat images if the split is small
        say("exporting the float twin to .tflite (LiteRT float)")
        float_tflite(run, torch.from_numpy(x[:2]), tmp)
        configs = build_configs(Path(args.run_dir), run, x, args.batches, args.threads, tmp, args.ort_default)
        peaks = peak_configs(tmp, args.threads) if args.profile else []
        say(f"timing {len(configs) + len(peaks)} configurations: {args.warmup} warm-up + {args.repeats} rounds"
            + (" (each engine's int8 GEMM peak among them)" if peaks else ""))
        t0 = time.perf_counter()
        samples = measure(configs + peaks, args.repeats, args.warmup, say=say)
        rows = summarise(configs, samples)
        timing_s = time.perf_counter() - t0
        profile = None
        if args.profile:
            say("profiling onnxruntime nodes and its GEMM kernels")
            peak_rows = summarise(peaks, samples)
            del peaks  # idle sessions off the machine before the one-at-a-time kernel timings
            macs = int(load_manifest(args.run_dir)["model"]["encoder_macs"])  # counted at export
            profile = {"batch": n, "threads": 1, "ort_int8_precision": ort_int8_precision(), "ort_nodes": {
                name: ort_node_profile(Path(args.run_dir) / "artifacts" / name, x)
                for name in ("encoder.int8.onnx", "encoder.float.onnx")},
                "gemm": {f"threads={t}": gemm_throughput(threads=t) for t in args.threads},
                "peaks": {"shape_mkn": list(GEMM_MKN), "rows": peak_rows},
                "encoder_macs_per_image": macs,
                "efficiency": efficiency(rows, samples, macs)}
    except (QdefendError, ArtifactError) as e:
        say(f"error: {e}")
        return 2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    exact, _ = int8_dot_product()
    rat = ratios(rows, samples, goal_x=GOAL_VNNI if exact else GOAL)
    result = {"benchmark": "qdefend.latency", "schema_version": 1, "started": started,
              "command": " ".join(["python", "benchmarks/latency.py", *(argv if argv is not None else sys.argv[1:])]),
              "run": {"dir": str(args.run_dir), "name": run.paths.root.resolve().name,
                      "input_shape": list(x.shape[1:]), "input": "test split, normalised"},
              "machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
              "settings": {"batches": args.batches, "threads": args.threads, "repeats": args.repeats,
                           "warmup": args.warmup, "min_sample_s": MIN_SAMPLE_S, "timing_s": round(timing_s, 1),
                           "order": "round-robin over configurations, shuffled per round",
                           "ort_session_config_threads_gt_1": NO_SPIN},
              "results": rows, "ratios": rat}
    if profile is not None:
        result["profile"] = profile
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, rat))
    for e in (profile or {}).get("efficiency", []):
        print(f"{e['engine']:12s} int8 batch {e['batch']:3d} threads {e['threads']}: {e['encoder_gmac_per_s']:6.1f} GMAC/s = "
              f"{100 * e['share_of_peak']:.0f}% of its int8 GEMM peak {e['peak_gmac_per_s']} "
              f"({'met' if e['met'] else 'MISSED'} {100 * e['goal']:.0f}%; {100 * e['share_of_best_peak']:.0f}% "
              f"of the peak's best sample {e['peak_best_gmac_per_s']})")
    print(f"load average start {load_start} end {result['load_average']['end']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
