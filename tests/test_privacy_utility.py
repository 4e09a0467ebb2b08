"""Tests for benchmarks/privacy_utility.py: the config table (every entry builds a valid RunConfig
and defense stack), rows built from fixed metrics/manifest/attack dicts, the CSV and the Pillow
plot on fixed points, and (slow) a quick end-to-end run of the script on two configs that checks
the JSON, CSV and PNG it writes and that a second run skips every stage.
"""

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "privacy_utility.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pu():
    yield from load_benchmark("privacy_utility")


def test_config_table_builds_valid_runs_and_defenses(pu):
    from qdefend.config import RunConfig
    from qdefend.defenses import build_defense

    assert set(pu.CONFIGS) == {"none", "noise-0.05", "noise", "noise+cem", "nopeek", "nopeek-2", "nopeek-4",
                               "noise+nopeek", "noise+nopeek+cem", "dropout", "arl", "patrol", "cut-3", "cut-4", "cut-6",
                               "cut-4+nopeek"}
    for size in pu.SIZES:
        for name in pu.CONFIGS:
            cfg = RunConfig.from_dict(pu.run_config(name, size))
            assert cfg.quant.scheme == "int8" and cfg.data.name == "fashion-mnist"
            stack = build_defense(cfg.defense)
            assert [d.name for d in stack.defenses] == ([] if cfg.defense.stack == "none" else cfg.defense.stack.split("+"))
    sigmas = {n: c["params"]["noise"]["sigma"] for n, c in pu.CONFIGS.items() if "noise" in c["params"]}
    assert sigmas == {"noise-0.05": 0.05, "noise": 0.1, "noise+cem": 0.1, "noise+nopeek": 0.1, "noise+nopeek+cem": 0.1}
    assert {n: c["params"]["nopeek"]["alpha"] for n, c in pu.CONFIGS.items() if n.startswith("nopeek")} == {
        "nopeek": 1.0, "nopeek-2": 2.0, "nopeek-4": 4.0}
    assert RunConfig.from_dict(pu.run_config("cut-4", "full")).model.cut == 4
    assert RunConfig.from_dict(pu.run_config("none", "full", seed=2)).train.seed == 2
    assert (pu.run_dirname("noise+cem"), pu.run_dirname("noise+cem", 2)) == ("noise_cem", "noise_cem-s2")
    assert RunConfig.from_dict(pu.run_config("nopeek", "full")).model.cut is None  # the reference split
    quick = RunConfig.from_dict(pu.run_config("noise", "quick"))
    assert (quick.data.limit_train, quick.data.limit_test, quick.train.epochs) == (512, 300, 1)
    full = RunConfig.from_dict(pu.run_config("noise", "full"))
    assert full.data.limit_train is None and full.train.epochs == 2
    assert pu.parse_configs(None, "quick") == ["none", "noise"] and pu.parse_configs(None, "full") == list(pu.CONFIGS)
    assert pu.parse_configs("noise+cem, none,none", "quick") == ["noise+cem", "none"]
    with pytest.raises(Exception, match="unknown config noize: choose from none, noise-0.05"):
        pu.parse_configs("none,noize", "quick")
    assert pu.run_dirname("noise+nopeek+cem") == "noise_nopeek_cem"


RECORDS = [{"event": "epoch", "epoch": 1, "time_s": 10.5}, {"event": "epoch", "epoch": 2, "time_s": 9.25},
           {"event": "test", "test_acc_int8": 0.81, "test_acc_fakequant": 0.82}]
MANIFEST = {"verification": {"artifacts": {"encoder.int8.tflite": {"test_acc": 0.8, "test_acc_release": 0.75},
                                           "encoder.int8.onnx": {"test_acc": 0.79}}}}
ATTACKS = {"decoder": {"metrics": {"mse": 0.03, "psnr": 15.2, "ssim": 0.4, "baseline_mse": 0.09, "leak_ratio": 3.0},
                       "timings": {"total_s": 4.5}},
           "clone_rmle": {"metrics": {"mse": 0.1, "ssim": 0.05, "baseline_mse": 0.08}, "timings": {"total_s": 10.0}}}


def test_build_row_from_fixed_results(pu, tmp_path):
    defense = pu.CONFIGS["noise"]
    row = pu.build_row("noise", defense, "encoder.int8.tflite", RECORDS, MANIFEST, ATTACKS)
    assert list(row) == pu.COLUMNS and row["seed"] == 0
    assert row["stack"] == "noise" and row["params"] == {"noise": {"sigma": 0.1}}
    assert (row["test_acc_int8"], row["test_acc_fakequant"], row["test_acc_artifact"], row["test_acc_release"]) == \
        (0.81, 0.82, 0.8, 0.75)
    assert (row["test_acc"], row["test_acc_source"]) == (0.75, "test_acc_release")
    assert row["epochs"] == 2 and row["train_time_s"] == 19.75
    assert (row["decoder_mse"], row["decoder_psnr"], row["decoder_ssim"], row["decoder_baseline_mse"]) == \
        (0.03, 15.2, 0.4, 0.09)
    assert (row["clone_rmle_mse"], row["clone_rmle_ssim"], row["decoder_time_s"]) == (0.1, 0.05, 4.5)
    onnx = pu.build_row("noise", defense, "encoder.int8.onnx", RECORDS, MANIFEST, {})
    assert (onnx["test_acc"], onnx["test_acc_source"], onnx["decoder_mse"]) == (0.79, "test_acc_artifact", None)
    bare = pu.build_row("none", pu.CONFIGS["none"], "encoder.int8.tflite", RECORDS[2:], {}, {})
    assert (bare["test_acc"], bare["test_acc_source"], bare["train_time_s"], bare["epochs"]) == \
        (0.81, "test_acc_int8", None, 0)

    path = tmp_path / "rows.csv"
    pu.write_csv([row, bare], path)
    got = list(csv.DictReader(path.open()))
    assert list(got[0]) == pu.COLUMNS and got[0]["params"] == '{"noise": {"sigma": 0.1}}'
    assert float(got[0]["decoder_mse"]) == 0.03 and got[1]["decoder_mse"] == ""

    ref = dict(bare, decoder_mse=0.02, clone_rmle_mse=0.05, clone_rmle_baseline_mse=0.08)
    md = pu.markdown([ref, row]).splitlines()
    assert md[0].startswith("| config |") and len(md) == 4
    assert md[2].startswith("| none | 1 | encoder.int8.tflite | 81.00 (+0.00) | 0.0200 (1.00x) |")
    # both on the Pareto front: none is more accurate, noise harder to invert
    assert md[3] == ("| noise | 1 | encoder.int8.tflite | 75.00 (-6.00) | 0.0300 (1.50x) | 0.400 | "
                     "0.1000 (above floor: attack failed) | yes | 0.3 |")
    worse = dict(row, config="worse", decoder_mse=0.025, test_acc=0.70)
    assert pu.markdown([ref, row, worse]).splitlines()[4].endswith("| 0.1000 (above floor: attack failed) |  | 0.3 |")

    # seeds: one line per config, mean ± sample std, the ratio and the points against none's means
    seeds = [dict(row, seed=1, test_acc=0.77, decoder_mse=0.036), dict(ref, seed=1, test_acc=0.83, decoder_mse=0.02)]
    agg = {r["config"]: r for r in pu.aggregate([ref, row, *seeds])}
    assert agg["noise"]["seeds"] == [0, 1] and agg["noise"]["decoder_mse"] == pytest.approx(0.033)
    assert agg["noise"]["decoder_mse_std"] == pytest.approx(0.0042426, rel=1e-4) and agg["none"]["test_acc"] == pytest.approx(0.82)
    assert pu.aggregate([bare])[0]["decoder_mse_std"] is None  # one seed: no spread
    md = pu.markdown([ref, row, *seeds]).splitlines()
    assert len(md) == 4 and md[3].startswith("| noise | 2 | encoder.int8.tflite | 76.00 ± 1.41 (-6.00) | "
                                             "0.0330 ± 0.0042 (1.65x) |")


@pytest.mark.slow
def test_quick_run_writes_rows_csv_png_and_resumes(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--size", "quick", "--configs", "none,noise", "--threads", "2",
           "--out", str(out), "--runs-dir", str(runs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_s = time.perf_counter() - t0
    d = json.loads((out / "privacy_utility.json").read_text())
    assert d["benchmark"] == "qdefend.privacy_utility" and d["schema_version"] == 1
    assert d["settings"]["size"] == "quick" and d["settings"]["attack_preset"] == "quick"
    assert d["machine"]["versions"]["torch"]
    rows = {r["config"]: r for r in d["rows"]}
    assert set(rows) == {"none", "noise"} and all(r["artifact"] == "encoder.int8.tflite" for r in rows.values())
    for r in rows.values():
        for key in ("test_acc", "test_acc_int8", "decoder_mse", "decoder_ssim", "decoder_baseline_mse",
                    "clone_rmle_mse", "train_time_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["config"], key, r[key])
        assert 0 <= r["test_acc"] <= 1 and r["decoder_mse"] > 0
    noise = rows["noise"]
    assert noise["stack"] == "noise" and noise["params"] == {"noise": {"sigma": 0.1}}
    assert noise["test_acc_source"] == "test_acc_release" and 0 <= noise["test_acc_release"] <= 1
    assert rows["none"]["test_acc_release"] is None
    assert len(list(csv.DictReader((out / "privacy_utility.csv").open()))) == 2
    assert (out / "privacy_utility.png").stat().st_size > 1000
    assert (runs / "noise" / "attacks" / "decoder-encoder.int8.tflite.json").is_file()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done already, skipped") == 2 * 4  # train, export, 2 attacks per config
    assert json.loads((out / "privacy_utility.json").read_text())["rows"] == d["rows"]
    print(f"quick run: {first_s:.0f} s")
