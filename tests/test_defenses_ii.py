"""Tests for benchmarks/defenses_ii.py: the config table (every entry builds a valid RunConfig and
defense stack), the run plan, the numbers each study takes from fixed attack results, mean/std
aggregation and the README tables on fixed rows, and (slow) a quick end-to-end run of one config
per study that checks the JSON and Markdown it writes and that a second run skips every stage.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "defenses_ii.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def d2():
    yield from load_benchmark("defenses_ii")


def test_every_config_builds_a_valid_int8_run_and_stack(d2):
    from qdefend.config import RunConfig
    from qdefend.defenses import build_defense

    for study in d2.STUDIES.values():
        assert set(study["configs"]) | set(study["ablations"]) <= set(d2.CONFIGS)
    for size in d2.SIZES:
        for name, spec in d2.CONFIGS.items():
            cfg = RunConfig.from_dict(d2.run_config(name, size, seed=2))
            assert cfg.quant.scheme == ("none" if name == "float" else "int8") and cfg.data.name == "fashion-mnist"
            assert cfg.quant.act_scales == ("learned" if "lsq" in name else "observed")
            assert cfg.train.seed == 2 + d2.SEED_OFFSET.get(name, 0)  # none-reseeded: another network
            stack = build_defense(cfg.defense)
            assert [d.name for d in stack.defenses] == ([] if spec["stack"] == "none" else spec["stack"].split("+"))
    pair = [d2.CONFIGS[n] for n in ("noise+cem", "noise+cem-slot")]
    assert {c["params"][c["stack"].split("+")[1]]["lam"] for c in pair} == {d2.LAM}  # cem vs cem-slot: same lambda
    assert {"noise", "noise+cem", "noise+cem-slot"} <= set(d2.STUDIES["cem"]["configs"])
    assert all(c["params"]["noise"] == d2.NOISE for n, c in d2.CONFIGS.items() if n.startswith("noise"))
    assert d2.run_dirname("noise+cem-slot", 1) == "noise_cem-slot-s1"


def test_plan_runs_every_seed_then_ablations_at_the_first(d2):
    a = d2.parse_args(["--study", "cem", "--size", "medium", "--seeds", "1,0", "--ablations"])
    jobs = d2.plan(a)
    n = 2 * len(d2.STUDIES["cem"]["configs"])
    assert [(c, s) for _, c, s in jobs[:n]] == [(c, s) for s in (1, 0) for c in d2.STUDIES["cem"]["configs"]]
    assert [(c, s) for _, c, s in jobs[n:]] == [(c, 1) for c in d2.STUDIES["cem"]["ablations"]]
    only = d2.plan(d2.parse_args(["--study", "vib,divqat", "--configs", "none"]))
    assert only == [("vib", "none", 0), ("divqat", "none", 0)]
    with pytest.raises(SystemExit):
        d2.parse_args(["--study", "cme"])
    with pytest.raises(SystemExit):
        d2.parse_args(["--configs", "noise+cme"])


def test_cem_finetune_study_starts_from_the_noise_run_of_the_same_seed(d2, tmp_path):
    from qdefend.config import RunConfig

    st = d2.STUDIES["cem-ft"]
    assert st["reference"] == "noise-ft" and set(st["configs"]) | set(st["ablations"]) <= set(d2.FINETUNES)
    for name in st["configs"] + st["ablations"]:
        cfg = RunConfig.from_dict(d2.run_config(name, "medium", 1, tmp_path))
        assert cfg.init_from == str(tmp_path / "noise-s1") and cfg.train.lr == d2.FT_TRAIN["lr"]
        if name != "noise-ft":  # the control: the same fine-tune without CEM
            assert cfg.defense.params["cem"]["schedule"] == "finetune"
    assert RunConfig.from_dict(d2.run_config("noise", "medium", 1, tmp_path)).init_from is None
    rows = [{"study": "cem-ft", "config": c, "seed": 0, "defense": {}, "test_acc": 0.85, "decoder_mse": m,
             "decoder_ssim": 0.6, "step_s": 0.3} for c, m in (("noise-ft", 0.010), ("noise+cem-ft", 0.013))]
    md = d2.markdown(d2.aggregate(rows))
    assert "x noise-ft" in md and "| noise+cem-ft | 1 | 85.00 | 0.0130 | 1.30x |" in md


@pytest.mark.slow
def test_quick_cem_finetune_trains_its_base_first(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--study", "cem-ft", "--size", "quick", "--configs", "noise+cem-ft",
           "--threads", "2", "--out", str(out), "--runs-dir", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (runs / "noise-s0" / "checkpoints" / "best.json").exists()
    recs = [json.loads(x) for x in (runs / "noise_cem-ft-s0" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "train_start" and recs[1]["train_cem/loss"] > 0  # CEM from the first step
    row = json.loads((out / "defenses_ii.json").read_text())["rows"][0]
    assert row["config"] == "noise+cem-ft" and row["decoder_mse"] > 0


REPURPOSE = {"metrics": {
    "designated_acc": 0.85, "best_unintended_acc": 0.9, "suppression_ratio": 0.85 / 0.9, "suppression_ratio_adv": 1.2,
    "acc_designated_linear": 0.8, "acc_designated_mlp": 0.9, "chance_bright_in_class": 0.5,
    "acc_bright_in_class_linear": 0.6, "acc_bright_in_class_mlp": 0.7, "chance_area_in_class": 0.52,
    "acc_area_in_class_linear": 0.52}}
KNOCKOFF = {"metrics": {"fidelity@1000": 0.8, "fidelity@5000": 0.9, "fidelity": 0.9, "clone_acc@5000": 0.85,
                        "victim_acc": 0.88, "queries": 5000.0}}


def test_attack_metrics_take_each_studys_numbers(d2):
    m = d2.attack_metrics("repurpose", REPURPOSE)
    assert m["same_task_probe_acc"] == 0.9 and m["acc_designated_linear"] == 0.8
    assert m["bright_in_class_adv"] == pytest.approx(0.4) and m["area_in_class_adv"] == pytest.approx(0.0)
    assert d2.attack_metrics("knockoff", KNOCKOFF) == {"fidelity@1000": 0.8, "fidelity@5000": 0.9, "fidelity": 0.9,
                                                       "clone_acc@5000": 0.85, "victim_acc": 0.88}
    cc = d2.attack_metrics("copycat", KNOCKOFF)
    assert cc["copycat_fidelity@5000"] == 0.9 and "fidelity@5000" not in cc  # no clash with knockoff's keys
    dec = d2.attack_metrics("decoder", {"metrics": {"mse": 0.02, "ssim": 0.5, "baseline_mse": 0.09, "psnr": 17}})
    assert dec == {"decoder_mse": 0.02, "decoder_ssim": 0.5, "decoder_floor": 0.09}
    recs = [{"event": "epoch", "train_time_s": 10.0, "steps": 100}, {"event": "epoch", "train_time_s": 30.0, "steps": 100},
            {"event": "epoch", "train_time_s": 12.0, "steps": 100}, {"event": "test"}]
    assert d2.step_time(recs) == pytest.approx(0.12) and d2.step_time([]) is None


def test_build_row_from_a_run_directory(d2, tmp_path):
    recs = [{"event": "epoch", "epoch": 1, "time_s": 20.0, "train_time_s": 15.0, "steps": 50},
            {"event": "epoch", "epoch": 2, "time_s": 22.0, "train_time_s": 16.0, "steps": 50},
            {"event": "test", "checkpoint": "epoch-0002", "test_acc_int8": 0.871, "test_acc_fakequant": 0.872}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = {"verification": {"artifacts": {d2.ARTIFACT: {"test_acc": 0.86, "test_acc_release": 0.865}}}}
    row = d2.build_row("divqat", "divqat", 0, tmp_path, manifest,
                       {"": {"knockoff": KNOCKOFF}, "reverse_sigmoid": {"knockoff": KNOCKOFF}})
    assert (row["checkpoint"], row["test_acc"], row["test_acc_artifact"]) == ("epoch-0002", 0.871, 0.865)
    assert row["train_time_s"] == 42.0 and row["step_s"] == pytest.approx(0.31)
    assert row["fidelity@5000"] == row["fidelity@5000@reverse_sigmoid"] == 0.9 and row["defense"] == d2.CONFIGS["divqat"]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(recs[0]) + "\n")  # no final evaluation yet
    assert d2.build_row("divqat", "divqat", 0, tmp_path, manifest, {})["test_acc"] == 0.865


def test_aggregate_and_tables_on_fixed_rows(d2):
    rows = [{"study": "cem", "config": "noise", "seed": s, "defense": {}, "test_acc": a, "decoder_mse": m,
             "decoder_ssim": 0.6, "step_s": 0.3, "note": "x"} for s, a, m in ((0, 0.86, 0.010), (1, 0.88, 0.014))]
    rows.append({"study": "cem", "config": "noise+cem", "seed": 0, "defense": {}, "test_acc": 0.85,
                 "decoder_mse": 0.018, "decoder_ssim": 0.5, "step_s": 0.45})
    aggs = d2.aggregate(rows)
    noise = next(a for a in aggs if a["config"] == "noise")
    assert noise["seeds"] == [0, 1] and noise["test_acc"] == pytest.approx(0.87)
    assert noise["decoder_mse_std"] == pytest.approx(math.sqrt(2) * 0.002) and "note" not in noise
    md = d2.markdown(aggs).splitlines()
    assert md[2] == "| noise | 2 | 87.00 ± 1.41 | 0.0120 ± 0.0028 | 1.00x | 0.600 ± 0.000 | 300 ± 0 |"
    assert md[3] == "| noise+cem | 1 | 85.00 | 0.0180 | 1.50x | 0.500 | 450 |"

    vib = dict(d2.attack_metrics("repurpose", REPURPOSE), study="vib", config="vib-mask", seed=0, defense={})
    fid = [dict(d2.attack_metrics("knockoff", KNOCKOFF), study="divqat", config=c, seed=0, defense={}, test_acc=0.88)
           for c in ("none", "divqat")]
    fid[1]["fidelity@5000"] = 0.6
    fid[1].update({f"{k}@reverse_sigmoid": v for k, v in d2.attack_metrics("knockoff", KNOCKOFF).items()})
    fid[1]["fidelity@5000@reverse_sigmoid"] = 0.5
    fid[1].update({f"copycat_{k}": v for k, v in d2.attack_metrics("knockoff", KNOCKOFF).items()})
    md = d2.markdown(d2.aggregate([vib, *fid]))
    assert "| vib-mask | 1 | 85.00 | - | 90.00 | 0.400 | 0.000 | - | 0.400 | no |" in md  # no none row: no delta
    assert "| none | 1 | 88.00 | 80.00 | 90.00 | 1.000x / - | - | - / - |" in md
    assert "| divqat | 1 | 88.00 | 80.00 | 60.00 | 0.667x / - | 50.00 | 90.00 / - |" in md
    # the OOD pool's columns; the learned-grid configs against their own control (none-lsq)
    ood = {f"{k}@{d2.OOD}": v for k, v in d2.attack_metrics("knockoff", KNOCKOFF).items()}
    more = [dict(r, **ood) for r in fid] + [dict(fid[0], config="none-lsq", **ood, test_acc=0.87),
                                            dict(fid[0], config="divqat-lsq", **{**ood, f"fidelity@5000@{d2.OOD}": 0.45})]
    md = d2.markdown(d2.aggregate(more))
    assert "aux fid@5000 (%) | OOD fid@1000 (%) | OOD fid@5000 (%) | x control (aux / OOD)" in md
    assert "| divqat-lsq | 1 | 88.00 | 80.00 | 90.00 | 80.00 | 45.00 | 1.000x / 0.500x | - | - / - |" in md


FROZEN = {"metrics": {
    "designated_acc": 0.84, "best_unintended_acc": 0.56, "ref_best_unintended_acc": 0.99, "suppression_ratio": 1.5,
    "suppression_chance_bound": 0.84 / 0.7, "suppression_ratio_adv": 3.0, "suppression_ratio_same_task": 4.0,
    "acc_designated_linear": 0.21, "acc_designated_mlp": 0.12, "ref_acc_designated_linear": 0.85,
    "ref_acc_designated_mlp": 0.86, "acc_footwear_linear": 0.56}}


def test_vib_study_frozen_protocol_fine_tunes_and_tables(d2, tmp_path):
    from qdefend.config import RunConfig

    st = d2.STUDIES["vib"]
    assert st["frozen_reference"] == st["reference"] == "none"
    for name in ("none-ft", "vib-mask-ft", "vib-mask-ft-beta0.01"):  # the paper's set-up: the none run, head frozen
        cfg = RunConfig.from_dict(d2.run_config(name, "medium", 0, tmp_path))
        assert cfg.init_from == str(tmp_path / "none-s0") and cfg.train.freeze == "head"
    assert d2.run_dirname("none-reseeded", 0) == "none-reseeded-s0"
    f = d2.attack_metrics("repurpose-frozen", FROZEN)
    assert f["frozen_suppression_ratio"] == 1.5 and f["frozen_ref_best_unintended_acc"] == 0.99
    assert f["frozen_same_task_acc"] == 0.21 and f["frozen_ref_same_task_acc"] == 0.86

    def row(config, acc, advs, frozen=None):
        r = {"study": "vib", "config": config, "seed": 0, "defense": {}, "designated_acc": acc,
             "same_task_probe_acc": acc - 0.01, "within_class_adv": max(advs),
             **{f"{t}_adv": a for t, a in zip(d2.ATTRIBUTES, advs)}}
        return {**r, **(frozen or {})}

    aggs = d2.aggregate([row("none", 0.88, (0.8, 0.77, 0.7)), row("vib-mask", 0.86, (0.39, 0.40, 0.2), f),
                         row("vib-mask-beta0.01", 0.80, (0.3, 0.3, 0.3), {**f, "frozen_suppression_ratio": 12.0})])
    md = d2.markdown(aggs)
    assert "| vib-mask | 1 | 84.00 | 99.00 | 56.00 | 1.50 | 1.20 | 21.00 | 4.00 | no |" in md
    assert "| vib-mask-beta0.01 | 1 | 84.00 | 99.00 | 56.00 | 12.00 | 1.20 | 21.00 | 4.00 | yes |" in md
    assert "| none | 1 | 88.00 | +0.00 | 87.00 | 0.800 | 0.770 | 0.700 | 0.800 | no |" in md
    assert "| vib-mask | 1 | 86.00 | -2.00 | 85.00 | 0.390 | 0.400 | 0.200 | 0.400 | yes |" in md  # both limits hold
    assert "| vib-mask-beta0.01 | 1 | 80.00 | -8.00 | 79.00 | 0.300 | 0.300 | 0.300 | 0.300 | no |" in md  # too costly
    assert md.index("Paper protocol") < md.index("Adaptive protocol")
    png = d2.vib_plot(aggs, tmp_path / "vib.png")
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_quick_run_of_one_config_per_study_writes_tables_and_resumes(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "--size", "quick", "--configs", "noise+cem-slot,vib-mask,divqat",
           "--threads", "2", "--out", str(out), "--runs-dir", str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads((out / "defenses_ii.json").read_text())
    assert d["benchmark"] == "qdefend.defenses_ii" and d["settings"]["attack_preset"] == "quick"
    rows = {r["config"]: r for r in d["rows"]}
    assert set(rows) == {"noise+cem-slot", "vib-mask", "divqat"}
    for r in rows.values():
        assert 0 < r["test_acc"] <= 1 and r["step_s"] > 0
    assert rows["noise+cem-slot"]["decoder_mse"] > 0
    assert 0 <= rows["vib-mask"]["designated_acc"] <= 1 and rows["vib-mask"]["suppression_ratio"] > 0
    assert rows["vib-mask"]["bright_in_class_adv"] is not None
    dq = rows["divqat"]
    assert {"fidelity@500", "fidelity@500@reverse_sigmoid", "copycat_fidelity@500", "fidelity@500@mnist5k",
            "copycat_fidelity@500@mnist5k"} <= set(dq)
    assert rows["vib-mask"]["frozen_suppression_ratio"] > 0 and rows["vib-mask"]["frozen_ref_best_unintended_acc"] > 0.5
    assert (runs / "none-s0" / "checkpoints" / "best.json").exists()  # the frozen protocol's reference, trained
    md = (out / "defenses_ii.md").read_text()
    assert md.count("| config | seeds |") == 4 and "| vib-mask | 1 |" in md
    assert (out / "cem_tradeoff.png").stat().st_size > 1000
    # the vib plot leaves out runs under 50% accuracy, which a quick run's near-chance vib-mask is
    assert (out / "vib_tradeoff.png").exists() == (rows["vib-mask"]["designated_acc"] >= 0.5)

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    # train + export per config and of the frozen reference; attacks: decoder, repurpose (adaptive and
    # frozen), knockoff x (2 service outputs + the OOD pool) + copycat x 2 pools
    assert again.stderr.count("done already, skipped") == 3 * 2 + 2 + 1 + 2 + 5
    assert json.loads((out / "defenses_ii.json").read_text())["rows"] == d["rows"]
