"""Tests for benchmarks/latency.py: the ratio and goal arithmetic on fixed numbers, and a smoke
run of the script on a tiny exported run (2 repeats, batch 1, 1 thread) that checks the JSON it
writes. No timing is asserted: speed is measured by the benchmark, not by tests.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark, tiny_exported_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "latency.py"
ENGINES = {("onnxruntime", "int8"), ("onnxruntime", "float"), ("litert", "int8"), ("litert", "float"),
           ("torch-eager", "float")}


@pytest.fixture(scope="module")
def latency():
    yield from load_benchmark("latency")


def _row(engine, precision, batch, threads, ms):
    return {"engine": engine, "precision": precision, "batch": batch, "threads": threads, "median_ms": ms,
            "p10_ms": ms, "p90_ms": ms, "per_image_us": ms * 1e3 / batch}


def test_ratios_goal_and_table_from_fixed_medians(latency):
    rows = [_row("onnxruntime", "int8", 64, 1, 4.0), _row("onnxruntime", "float", 64, 1, 10.0),
            _row("litert", "int8", 64, 1, 6.0), _row("litert", "float", 64, 1, 9.0),
            _row("torch-eager", "float", 64, 1, 30.0), _row("onnxruntime", "int8", 1, 1, 1.0),
            _row("onnxruntime", "float", 1, 1, 1.5), _row("onnxruntime-default", "int8", 64, 1, 5.0)]
    samples = {("onnxruntime", "int8", 64, 1): [0.004, 0.002], ("onnxruntime", "float", 64, 1): [0.010, 0.010]}
    samples.update({(r["engine"], r["precision"], r["batch"], r["threads"]): [r["median_ms"] / 1e3] * 2
                    for r in rows if (r["engine"], r["precision"], r["batch"], r["threads"]) not in samples})
    rat = latency.ratios(rows, samples)
    sp = {(r["engine"], r["batch"]): r for r in rat["int8_vs_float"]}
    assert sp[("onnxruntime", 64)]["int8_speedup"] == 2.5
    assert sp[("onnxruntime", 64)]["int8_speedup_paired"] == 3.75  # median of 10/4 and 10/2
    assert sp[("litert", 64)]["int8_speedup"] == 1.5 and sp[("onnxruntime", 1)]["int8_speedup"] == 1.5
    assert sp[("onnxruntime-default", 64)]["float_ms"] == 10.0  # compared with the ORT float artifact
    vt = {(r["engine"], r["precision"]): r["speedup_vs_torch_eager"] for r in rat["vs_torch_eager"] if r["batch"] == 64}
    assert vt == {("onnxruntime", "int8"): 7.5, ("onnxruntime", "float"): 3.0, ("litert", "int8"): 5.0,
                  ("litert", "float"): 3.333, ("onnxruntime-default", "int8"): 6.0}
    goal = rat["goal"]
    assert goal["batch"] == 64 and goal["target_int8_speedup"] == 2.0
    assert goal["per_engine"]["onnxruntime"] == {"speedup": {"threads=1": 2.5}, "met": True}
    assert goal["per_engine"]["litert"]["met"] is False and goal["met"] is False
    text = latency.table(rows, rat)
    assert "litert {'threads=1': 1.5} MISSED" in text and "onnxruntime {'threads=1': 2.5} met" in text


def test_share_of_peak_pairs_the_encoder_and_peak_samples_of_each_round(latency):
    """Peak and encoder are timed in the same rounds; the share is the median of each round's
    ratio, so a round where the whole machine ran slow counts as one round, not as a slow peak."""
    m, k, n = 100, 10, 10  # 10,000 MACs per peak call
    rows = [_row("litert", "int8", 10, 1, 1.0), _row("litert", "float", 10, 1, 3.0), _row("onnxruntime", "int8", 10, 2, 1.0)]
    samples = {("litert", "int8", 10, 1): [1e-6, 2e-6, 1e-6],  # 1,000 MACs per image: 10, 5, 10 GMAC/s
               ("litert-gemm-peak", "int8", m, 1): [1e-6, 2e-6, 2e-6]}  # 10, 5, 5 GMAC/s
    eff = latency.efficiency(rows, samples, 1000, mkn=(m, k, n))
    assert len(eff) == 1  # no float row, and no ORT peak was timed
    (e,) = eff
    assert e["encoder_gmac_per_s"] == 10.0 and e["peak_gmac_per_s"] == 5.0
    assert e["share_of_peak"] == 1.0 and e["met"] is True  # ratios 1, 1, 2 (a ratio of medians says 2)
    assert e["peak_p10_p90"] == [5.0, 9.0] and e["peak_best_gmac_per_s"] == 10.0
    assert e["share_of_best_peak"] == 1.0  # the encoder's median 10 against the best 10


def test_cli_lists_are_checked(latency):
    args = latency.parse_args(["run", "--batches", "64,1,64", "--threads", "2"])
    assert args.batches == [1, 64] and args.threads == [2] and args.repeats >= 1
    with pytest.raises(SystemExit):
        latency.parse_args(["run", "--batches", "0,1"])
    with pytest.raises(SystemExit):
        latency.parse_args(["run", "--repeats", "0"])


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A tiny QAT run (quarter-width encoder, 256 images, 1 epoch), exported with both int8 formats."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tiny_exported_run(tmp_path_factory.mktemp("bench") / "tiny")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_smoke_run_writes_the_json_schema(exported_run, tmp_path):
    out = tmp_path / "latency.json"
    cmd = [sys.executable, str(SCRIPT), str(exported_run), "--repeats", "2", "--warmup", "1",
           "--batches", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median ms" in proc.stdout and "goal int8 >= " in proc.stdout
    d = json.loads(out.read_text())
    assert d["benchmark"] == "qdefend.latency" and d["schema_version"] == 1
    m = d["machine"]
    assert isinstance(m["cpu"], str) and m["logical_cpus"] >= 1
    assert set(m["flags"]) >= {"avx2", "avx512f", "avx512_vnni"} and all(isinstance(v, bool) for v in m["flags"].values())
    assert m["versions"]["onnxruntime"] and m["versions"]["ai-edge-litert"] and m["versions"]["torch"]
    assert len(d["load_average"]["start"]) == 3 and len(d["load_average"]["end"]) == 3
    assert d["settings"]["repeats"] == 2 and d["settings"]["batches"] == [1] and d["settings"]["threads"] == [1]
    rows = d["results"]
    assert {(r["engine"], r["precision"]) for r in rows} == ENGINES and len(rows) == len(ENGINES)
    for r in rows:
        assert r["batch"] == 1 and r["threads"] == 1 and r["repeats"] == 2 and r["calls_per_sample"] >= 1
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        # both are rounded (median_ms to 1e-4 ms, per_image_us to 1e-2 us): equal within that
        assert r["per_image_us"] == pytest.approx(r["median_ms"] * 1e3, abs=0.06)
    rat = d["ratios"]
    assert {r["engine"] for r in rat["int8_vs_float"]} == {"onnxruntime", "litert"}
    for r in rat["int8_vs_float"]:
        assert r["int8_speedup"] == pytest.approx(r["float_ms"] / r["int8_ms"], abs=6e-4)  # rounded to 1e-3
        assert r["int8_speedup_paired"] > 0
    assert len(rat["vs_torch_eager"]) == 4
    assert set(rat["goal"]["per_engine"]) == {"onnxruntime", "litert"} and isinstance(rat["goal"]["met"], bool)
    from qdefend.edge.cpu import int8_dot_product

    assert rat["goal"]["target_int8_speedup"] == (3.0 if int8_dot_product()[0] else 2.0)  # VNNI/ARM: 3x
    assert m["ort_int8_precision"]["mode"] in ("fast", "precise")
    assert "profile" not in d
