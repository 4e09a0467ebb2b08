"""Tests for benchmarks/wire_bits.py: the run configs (a fine-tune of the base per width and
defense), the table from fixed rows, argument errors, and (slow) a quick end-to-end run that
checks the JSON, table and plot it writes and the bytes per image it measures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "wire_bits.py"


@pytest.fixture(scope="module")
def wb():
    yield from load_benchmark("wire_bits")


def test_configs_fine_tune_the_base_at_each_width(wb, tmp_path):
    from qdefend.config import RunConfig

    base = wb.run_config("full", None, None, None)
    assert RunConfig.from_dict(base).quant.wire_bits == 8 and "init_from" not in base
    for defense in wb.DEFENSES:
        for bits in wb.BITS:
            cfg = RunConfig.from_dict(wb.run_config("full", defense, bits, tmp_path / "base"))
            assert cfg.quant.wire_bits == bits and cfg.init_from == str(tmp_path / "base")
            assert cfg.defense.stack == wb.DEFENSES[defense]["stack"] and cfg.train.epochs == 1


def test_table_reports_ratios_against_the_8_bit_row(wb):
    row = {"defense": "none", "test_acc": 0.9, "decoder_mse": 0.01, "decoder_ssim": 0.7, "gan_mse": None,
           "knockoff_fidelity": 0.9, "payload_bytes_per_image": 392, "body_bytes_batch1": 460}
    rows = [{**row, "bits": 8}, {**row, "bits": 4, "decoder_mse": 0.015, "payload_bytes_per_image": 196,
                                 "body_bytes_batch1": 264}]
    md = wb.markdown(rows)
    assert "| none | 4 | 90.00% | 0.0150 | 1.50x | 1.50x | 0.700 | - | 90.00% | 196 | 264 |" in md
    assert "| none | 8 | 90.00% | 0.0100 | 1.00x | 1.00x |" in md
    noise = [{**row, "defense": "noise", "bits": 8, "decoder_mse": 0.02}, {**row, "defense": "noise", "bits": 2,
                                                                              "decoder_mse": 0.03}]
    assert "| noise | 2 | 90.00% | 0.0300 | 1.50x | 3.00x |" in wb.markdown(rows + noise)


@pytest.mark.parametrize("argv, words", [
    (["--bits", "9"], "--bits: choose from 8, 6, 4, 2"),
    (["--defenses", "cem"], "--defenses: choose from none, noise"),
    (["--preset", "foo=bar"], "ATTACK is one of decoder, gan, knockoff"),
    (["--base", "/nonexistent"], "not a qdefend run"),
])
def test_bad_arguments_get_one_line(wb, argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        wb.parse_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_writes_json_table_plot_and_measures_bytes(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--size", "quick", "--threads", "2", "--out", str(out), "--runs-dir", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads((out / "wire_bits.json").read_text())
    assert d["benchmark"] == "qdefend.wire_bits" and d["machine"]["versions"]["torch"]
    rows = {r["bits"]: r for r in d["rows"]}
    assert set(rows) == {8, 4}
    assert rows[8]["payload_bytes_per_image"] == 392 and rows[4]["payload_bytes_per_image"] == 196
    assert rows[8]["body_bytes_batch1"] == 460 and rows[4]["body_bytes_batch1"] == 264
    assert rows[4]["wire"]["bits"] == 4 and rows[4]["roundtrip_exact"] is True
    for r in rows.values():
        assert 0 <= r["test_acc"] <= 1 and r["decoder_mse"] > 0
    assert (out / "wire_bits.png").stat().st_size > 1000
    assert "| none | 4 |" in (out / "wire_bits.md").read_text()
