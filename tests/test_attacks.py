"""Tests for qdefend.attacks: the attack contract (requirements, refusals, configs), metrics and
verdicts on hand-computable inputs, and the attacks themselves on a small real QAT run exported to
ONNX and TFLite.

The leak tests are the point: on an undefended run the decoder attack (CEM's residual decoder at
the demo's budget) must reconstruct recognisably (SSIM >= 0.68 and MSE at most a seventh of the
mean-image floor) through the int8 TFLite artifact, so a weakened attack fails CI. They train for a minute and carry the ``slow`` marker
(CI runs them); the fast tests use the ``quick`` presets.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from qdefend.attacks import ATTACKS, AttackError, AttackResult, build_attack, open_target
from qdefend.attacks.grid import save_grid
from qdefend.attacks.metrics import bootstrap_ci, image_metrics, mean_image_baseline
from qdefend.attacks.report import fidelity_gain, fidelity_verdict, gain_verdict, paired_verdict
from qdefend.attacks.runner import attack_run, parse_params
from qdefend.config import RunConfig
from qdefend.errors import QdefendError


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ contract, metrics, verdicts


def test_registry_lists_every_attack_family():
    names = set(ATTACKS.names())
    assert {"decoder", "gan", "rmle", "shadow", "clone_rmle", "knockoff", "copycat", "jbda", "repurpose"} <= names
    with pytest.raises(QdefendError, match="decoder"):
        build_attack("no-such-attack")


def test_bad_parameters_say_what_to_write():
    with pytest.raises(AttackError, match=r"decoder.epochs must be an integer > 0.*--set epochs="):
        build_attack("decoder", epochs=0)
    with pytest.raises(AttackError, match="has no parameter 'epoch'. Valid parameters: .*epochs"):
        build_attack("decoder", epoch=3)
    with pytest.raises(AttackError, match="budgets must be positive"):
        build_attack("knockoff", budgets="10,-3")
    with pytest.raises(AttackError, match="arch must be one of victim, generic"):
        build_attack("clone_rmle", arch="vgg")
    assert parse_params(["epochs=5", "budgets=1000,5000", "through_twin=true", "clone=cnn"]) == {
        "epochs": 5, "budgets": "1000,5000", "through_twin": True, "clone": "cnn"}
    with pytest.raises(AttackError, match="KEY=VALUE"):
        parse_params(["epochs"])


def test_image_metrics_and_floor_on_known_images():
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 28, 28), dtype=np.float32)
    same = image_metrics(x, x)
    assert same["mse"] == 0 and same["ssim"] == pytest.approx(1.0) and same["psnr"] == pytest.approx(100.0)
    half = image_metrics(np.zeros_like(x), np.full_like(x, 0.5))
    assert half["mse"] == pytest.approx(0.25) and half["psnr"] == pytest.approx(10 * np.log10(4))
    base = mean_image_baseline(np.stack([np.zeros((1, 28, 28)), np.ones((1, 28, 28))]).astype(np.float32),
                               np.zeros((2, 1, 28, 28), np.float32))
    assert base["mse"] == pytest.approx(0.25)  # the mean image is 0.5 everywhere
    lo, hi = bootstrap_ci(np.r_[np.zeros(50), np.ones(50)], seed=0)
    assert lo < 0.5 < hi and hi - lo < 0.3


def test_paired_verdict_directions():
    rng = np.random.default_rng(1)
    f = rng.random(200) * 0.02 + 0.01
    same = paired_verdict("mse", f, f + rng.normal(0, 1e-4, 200), floor=0.1)
    assert same["keeps_privacy"] and "no significant difference" in same["text"] and "0.20x the mean-image" in same["text"]
    worse = paired_verdict("mse", f, f * 0.5)  # int8 reconstructions closer: leaks more
    assert not worse["keeps_privacy"] and worse["text"].startswith("int8 leaks more than float")
    better = paired_verdict("ssim", f + 0.5, f + 0.2)  # lower SSIM on int8: harder to invert
    assert better["keeps_privacy"] and "harder to invert" in better["text"]
    tiny = paired_verdict("psnr", f + 20, f + 20 - 0.005)  # significant, but 0.005 dB of 20
    assert tiny["keeps_privacy"] and "negligible" in tiny["text"]
    fid = fidelity_verdict("fidelity", 0.90, 0.95, 5000)
    assert not fid["keeps_privacy"] and fid["ci"][0] > 0


def test_gain_verdict_says_what_a_defense_buys():
    rng = np.random.default_rng(2)
    base = rng.random(300) * 0.02 + 0.01
    more = gain_verdict("mse", base, base * 1.8 + rng.normal(0, 1e-4, 300))
    assert more["gains_privacy"] and more["ratio"] == pytest.approx(1.8, rel=0.02)
    assert more["text"].startswith("more private than the baseline") and "1.80x the baseline's" in more["text"]
    same = gain_verdict("ssim", base + 0.6, base + 0.6 + rng.normal(0, 1e-3, 300))
    assert not same["gains_privacy"] and same["text"].startswith("no significant privacy gain")
    worse = gain_verdict("ssim", base + 0.5, base + 0.6)  # higher SSIM when defended: easier to invert
    assert not worse["gains_privacy"] and worse["text"].startswith("less private")
    failed = gain_verdict("mse", base, base + 0.1, floor=0.09)  # the defended side is above the floor
    assert failed["gains_privacy"] and failed["attack_failed"] and "failed there" in failed["text"]
    assert not more["attack_failed"]
    fid = fidelity_gain("fidelity", 0.92, 0.60, 1000)
    assert fid["gains_privacy"] and fid["ci"][1] < 0 and "-32.00 points" in fid["text"]
    assert not fidelity_gain("fidelity", 0.92, 0.915, 1000)["gains_privacy"]
    with pytest.raises(ValueError, match="differ in shape"):
        gain_verdict("mse", base, base[:10])


def test_the_demo_says_how_far_its_lighter_preset_is_from_full_strength(tmp_path):
    from qdefend.attacks.report import preset_gap

    from dataclasses import asdict

    from qdefend.attacks.inversion.decoder import DecoderConfig

    today = asdict(DecoderConfig())
    rows = [{"target": "undefended", "cell": "default", "config": {**today, "augment": "none"},  # an older default
             "metrics": {"mse": 0.0200, "ssim": 0.70}},
            {"target": "undefended", "cell": "fast-preset", "metrics": {"mse": 0.0300, "ssim": 0.60}},
            {"target": "undefended-b", "cell": "default", "config": today, "metrics": {"mse": 0.0100, "ssim": 0.75}},
            {"target": "undefended-b", "cell": "fast-preset", "metrics": {"mse": 0.0110, "ssim": 0.72}},
            {"target": "noise-0.1", "cell": "default", "config": today, "metrics": {"mse": 0.5, "ssim": 0.1}}]
    path = tmp_path / "attack_strength.json"
    path.write_text(json.dumps({"rows": rows}))
    text = preset_gap("decoder", "fast", path)
    assert "lighter 'fast' preset" in text and "MSE 0.0110 vs 0.0100 at full strength (+10%)" in text
    assert "SSIM 0.720 vs 0.750" in text
    assert "measured by benchmarks/attack_strength.py" in preset_gap("decoder", "fast", tmp_path / "none.json")
    # the default path is the checked-in benchmark result: the demo must find it from the package
    measured = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "attack_strength" /
                           "attack_strength.json").read_text())["rows"]
    full = next(r for r in measured if r["target"].startswith("undefended") and r["cell"] == "default"
                and r["config"].get("augment") == today["augment"])["metrics"]["mse"]
    assert f"vs {full:.4f} at full strength" in preset_gap("decoder", "fast")


def test_result_round_trip_and_grid(tmp_path):
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    r = AttackResult(attack="decoder", target="t", metrics={"mse": np.float32(0.5), "bad": float("nan")},
                     config={"epochs": 1}, seed=3, originals=x, reconstructions=x[::-1].copy(),
                     extra={"per_image": {"mse": [0.1, 0.2, 0.3]}})
    p = r.save(tmp_path / "a.json")
    back = AttackResult.load(p)
    assert json.loads(p.read_text())["metrics"] == {"mse": 0.5, "bad": None}
    assert back.seed == 3 and np.array_equal(back.reconstructions, x[::-1])
    png = save_grid([("a", x), ("b", x)], tmp_path / "g.png", n=3, scale=2)
    from PIL import Image

    assert Image.open(png).size == (3 * (16 + 2) + 2, 2 * (14 + 16 + 2) + 2)


# ------------------------------------------------------------------ a small real run, exported


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Undefended QAT int8 reference split: 1 epoch on 2,000 real images, the attacker's 5,000 aux
    images (the default aux size), 1,000 test images; exported to ONNX and TFLite."""
    from qdefend.export import export_run
    from qdefend.run import load_run
    from qdefend.train import Trainer

    root = tmp_path_factory.mktemp("runs") / "small"
    cfg = RunConfig.from_dict({
        "data": {"limit_train": 2000, "limit_test": 1000, "val_size": 200, "aux_size": 5000},
        "quant": {"scheme": "int8"},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    })
    Trainer(cfg, root, progress=False).fit()
    export_run(root, verify_images=200)
    return root, load_run(root)


def test_targets_state_what_they_offer_and_agree(small_run):
    root, run = small_run
    x = run.data.test.floats(slice(0, 16))
    t_f = open_target(root, "torch-float", run=run)
    t_q = open_target(root, "torch-int8", run=run)
    t_o = open_target(root, "encoder.int8.onnx", run=run)
    t_l = open_target(root, "encoder.int8.tflite", run=run)
    assert t_f.offers == {"features", "gradients"} and t_l.offers == {"features"} and t_l.kind == "litert"
    zs = [t.features(x, seed=0) for t in (t_f, t_q, t_o, t_l)]
    for z in zs[1:]:  # the same wire grid: int8 numerics agree to a few steps
        assert z.shape == zs[0].shape and np.abs(z - zs[0]).max() <= 0.1
    assert np.abs(zs[2] - zs[3]).mean() < 2e-3
    svc = open_target(root, "service:encoder.int8.tflite", run=run)
    p = svc.predict_proba(x)
    assert p.shape == (16, 10) and np.allclose(p.sum(1), 1, atol=1e-5)
    with pytest.raises(AttackError, match="offers features, not probabilities"):
        t_l.predict_proba(x)
    with pytest.raises(AttackError, match="has no artifact 'encoder.int4.tflite'. Valid targets: .*encoder.int8.tflite"):
        open_target(root, "encoder.int4.tflite", run=run)


def test_simulated_release_is_what_the_device_sends(small_run):
    import torch

    root, run = small_run
    x = run.data.test.floats(slice(0, 64))
    for spec in ("encoder.int8.tflite", "encoder.int8.onnx", "torch-float"):
        t = open_target(root, spec, run=run)
        z = t.encoder_output(x)
        assert z.shape == (64, *t.feature_shape) and not t.random_release
        sim = t.simulate_release(torch.from_numpy(z), torch.Generator().manual_seed(0)).numpy()
        assert np.array_equal(sim, t.features(x, release=True)), spec  # the wire grid, bit for bit
    t = open_target(root, "encoder.int8.tflite", run=run)
    t.release = {"steps": [{"type": "gaussian_noise", "sigma": 0.1}]}  # as a noise run's manifest says
    assert t.random_release
    z = t.encoder_output(x)
    a, b = (t.simulate_release(torch.from_numpy(z), torch.Generator().manual_seed(s)).numpy() for s in (1, 2))
    mid = (z > 0.35) & (z < 0.65)  # away from this [0, 1] wire grid's clipping
    assert not np.array_equal(a, b) and abs(float((a - z)[mid].std()) - 0.1) < 0.01  # fresh draws, the right sigma


def test_attack_strength_cache_serves_the_artifacts_features(small_run, tmp_path):
    from conftest import load_benchmark

    from qdefend.edge.manifest import sha256_file

    root, run = small_run
    gen = load_benchmark("attack_strength")
    bench = next(gen)
    try:
        bench.N_TRAIN_IMAGES = 200
        path = bench.build_cache(str(root), "encoder.int8.tflite", "small", tmp_path)
        t = bench.CachedTarget.load(path)
        real = open_target(root, "encoder.int8.tflite", run=run)
        data = bench.cached_data(t)
        x = data.test.floats(slice(0, 50))
        assert np.array_equal(t.features(x, seed=3), real.features(x, seed=3))
        assert np.array_equal(t.encoder_output(x), real.encoder_output(x))
        # images outside the cache (an attacker's augmented views) are answered by the run's artifact
        mixed = np.concatenate([x[:5], x[5:20, ..., ::-1]])
        assert np.array_equal(t.features(mixed, seed=3), real.features(mixed, seed=3))
        bench.ROWS = tmp_path / "rows"
        row = bench.run_cell((str(path), "default", "cpu", {"epochs": 1, "blocks": 0, "width": 8, "n_eval": 50,
                                                             "protocol": "train_time", "aux_size": 300,
                                                             "oracle_epochs": 0, "augment": "flip"}))
        assert row["cell"] == "default" and row["attacker"]["attacker_images"] == 300 and row["metrics"]["mse"] > 0
        assert row["training"]["views"] == 2
        assert (tmp_path / "rows" / "small--default.json").is_file() and "cpu" in row["machine"]
        sha = sha256_file(root / "artifacts" / "encoder.int8.tflite")
        assert row["artifact_sha256"] == sha  # the rows say which artifact they attacked
        assert f"| small | {sha[:8]} | default | 300 | 1 |" in bench.table([row])
    finally:
        gen.close()


def test_rmle_refuses_an_int8_artifact_and_names_the_alternative(small_run):
    root, run = small_run
    t = open_target(root, "encoder.int8.tflite", run=run)
    with pytest.raises(AttackError, match=r"needs gradients; .*offers features\. Use --attack clone_rmle"):
        build_attack("rmle", preset="quick").run(t, run.data)
    r = build_attack("rmle", preset="quick", through_twin=True).run(t, run.data)
    assert "attacked through the fake-quant twin" in " ".join(r.notes) and r.extra["gradients_from"] == "torch-float"


@pytest.mark.parametrize("spec", ["torch-float", "torch-int8", "encoder.int8.onnx", "encoder.int8.tflite"])
def test_the_same_decoder_code_runs_on_all_four_encoder_targets(small_run, spec):
    root, run = small_run
    res, _ = attack_run(root, spec, "decoder", preset="quick", run=run, save=False)
    m = res.metrics
    assert res.target == spec and m["mse"] < m["baseline_mse"] and m["ssim_lo"] <= m["ssim"] <= m["ssim_hi"]


@pytest.mark.parametrize("attack", ["decoder", "gan", "rmle", "shadow", "clone_rmle", "knockoff", "copycat", "jbda",
                                    "repurpose"])
def test_every_attack_runs_quick_and_writes_its_result(small_run, attack):
    root, run = small_run
    art = "torch-float" if attack == "rmle" else "encoder.int8.tflite"
    res, path = attack_run(root, art, attack, preset="quick", run=run)
    d = json.loads(path.read_text())
    assert d["attack"] == attack and d["seed"] == 0 and d["timings"]["total_s"] > 0
    assert all(v is None or np.isfinite(v) for v in d["metrics"].values())
    if ATTACKS.get(attack).family == "inversion":
        assert path.with_suffix(".png").is_file() and res.reconstructions.shape[1:] == (1, 28, 28)
        assert 0 < d["metrics"]["mse"] and d["metrics"]["baseline_mse"] > 0
    if attack in ("decoder", "gan"):  # the learning attackers record their curve, data split and convergence
        tr = d["extra"]["training"]
        assert len(tr["curve"]) == tr["epochs_run"] and d["metrics"]["converged"] in (0.0, 1.0)
        assert d["extra"]["attacker"]["protocol"] == "train_time" and d["extra"]["attacker"]["holdout"] > 0
        assert any("had not converged" in n or "not settled" in n for n in d["extra"]["notes"])  # 2-3 epochs
    if attack == "gan":
        assert {"decoder_mse", "sharpness", "decoder_sharpness"} <= set(d["metrics"])
    if ATTACKS.get(attack).family == "extraction":
        assert d["target"] == "service:encoder.int8.tflite" and 0 <= d["metrics"]["fidelity"] <= 1


def test_compare_quick_writes_report_with_verdicts(small_run, tmp_path):
    from qdefend.attacks.report import CompareConfig, compare

    root, _ = small_run
    rep = compare([root], CompareConfig(attacks=["decoder", "knockoff"], quick=True), tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "`encoder.float.onnx`" in md and "`encoder.int8.tflite`" in md and "![reconstructions]" in md
    verdicts = rep["runs"][0]["verdicts"]
    assert {v["metric"] for v in verdicts} == {"mse", "psnr", "ssim", "fidelity", "clone_acc"}
    assert all("95% interval" in v["text"] for v in verdicts)
    assert "| converged |" in md and "**no: lower bound**" in md and "not a privacy figure" in md
    assert (tmp_path / "rep" / "figures" / "small-reconstructions.png").is_file()
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]["name"] == "small"


def test_compare_with_a_baseline_says_what_each_run_buys_against_it(small_run, tmp_path):
    """The same run under another name is no defense: every gain is ~1x and none is significant."""
    import shutil

    from qdefend.attacks.report import CompareConfig, compare

    root, _ = small_run
    twin = tmp_path / "twin"
    compare([root], CompareConfig(attacks=["decoder", "knockoff"], quick=True), tmp_path / "first")
    shutil.copytree(root, twin)  # its attack results come along and are re-used (same checkpoint, same bytes)
    rep = compare([root, twin], CompareConfig(attacks=["decoder", "knockoff"], quick=True, baseline=str(root)),
                  tmp_path / "rep")
    assert rep["baseline"] == str(root) and "gains" not in rep["runs"][0]
    gains = rep["runs"][1]["gains"]
    assert {(g["artifact"], g["attack"], g["metric"]) for g in gains} == {
        (a, "decoder", m) for a in ("encoder.float.onnx", "encoder.int8.tflite") for m in ("mse", "ssim")} | {
        (a, "knockoff", "fidelity") for a in ("encoder.float.onnx", "encoder.int8.tflite")}
    assert all(not g["gains_privacy"] and g["acc_change_points"] == 0 for g in gains)
    assert all(g["ratio"] == pytest.approx(1.0) for g in gains if g["metric"] == "mse")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"## What each defense buys, against `{root}`" in md and "| twin | `encoder.int8.tflite` |" in md
    assert "Trained with: defense none, cut 2 of vgg11_bn (its reference cut)." in md
    assert (tmp_path / "rep" / "figures" / "defenses-encoder_int8_tflite.png").is_file()


def test_saved_results_are_reused_only_for_the_same_target_files(small_run):
    from qdefend.attacks.runner import cached_result, target_fingerprint

    root, run = small_run
    arts = json.loads((root / "manifest.json").read_text())["artifacts"]
    fp = target_fingerprint(root, "encoder.int8.tflite")
    assert set(fp) == {"checkpoint", "encoder.int8.tflite"} and fp["encoder.int8.tflite"] == arts["encoder.int8.tflite"]["sha256"]
    assert set(target_fingerprint(root, "service:encoder.int8.tflite")) == {"checkpoint", "encoder.int8.tflite",
                                                                          "head.float.onnx"}
    _, path = attack_run(root, "encoder.int8.tflite", "decoder", preset="quick", run=run)
    atk = build_attack("decoder", preset="quick")
    assert cached_result(root, "encoder.int8.tflite", atk, preset="quick") is not None
    assert cached_result(root, "encoder.int8.tflite", atk) is None  # another preset
    assert cached_result(root, "encoder.int8.tflite", build_attack("decoder", preset="quick", epochs=1),
                         preset="quick") is None  # another config
    saved = path.read_text()
    try:  # a result computed against other artifact bytes (a re-export) is stale
        d = json.loads(saved)
        d["extra"]["fingerprint"]["encoder.int8.tflite"] = "0" * 64
        path.write_text(json.dumps(d))
        assert cached_result(root, "encoder.int8.tflite", atk, preset="quick") is None
    finally:
        path.write_text(saved)


def test_saved_results_behind_a_service_output_are_reused_for_that_output_only(small_run):
    from qdefend.attacks.runner import cached_result

    root, run = small_run
    spec, atk = "service:encoder.int8.tflite", build_attack("copycat", preset="quick")
    _, path = attack_run(root, spec, "copycat", preset="quick", run=run, service_output="round:2")
    assert path.name == "copycat-service_encoder.int8.tflite@round2.json"
    assert cached_result(root, spec, atk, preset="quick", service_output="round:2") is not None
    assert cached_result(root, spec, atk, preset="quick", service_output="round:decimals=2") is not None
    assert cached_result(root, spec, atk, preset="quick", service_output="round:3") is None
    # the plain service keeps a result of its own beside the rounded one (made here unless an
    # earlier test made it), and each query gets its own
    if cached_result(root, spec, atk, preset="quick") is None:
        attack_run(root, spec, "copycat", preset="quick", run=run)
    plain = cached_result(root, spec, atk, preset="quick")
    assert plain is not None and "service_output" not in plain.extra
    assert cached_result(root, spec, atk, preset="quick", service_output="round:2").extra[
        "service_output"] == "round:decimals=2"


# ------------------------------------------------------------------ the undefended model leaks


@pytest.mark.slow
def test_undefended_int8_artifact_leaks_to_the_decoder(small_run):
    root, run = small_run
    # CEM's residual decoder at the demo's CPU budget (the "fast" preset) on the 5,000 aux images
    # (train_time: this run keeps only 1,000 test images); ~4 min on one thread
    res, _ = attack_run(root, "encoder.int8.tflite", "decoder", run=run, preset="fast",
                        params={"protocol": "train_time", "n_eval": 200, "oracle_epochs": 0})
    m = res.metrics
    assert m["ssim"] >= 0.68, m  # measured 0.720 (MSE 0.0090, floor 0.087); the plain decoder's test asked 0.6
    assert m["mse"] <= m["baseline_mse"] / 7, m
    assert res.extra["training"]["curve"][-1] < res.extra["training"]["curve"][0] / 2


@pytest.mark.slow
def test_undefended_int8_artifact_leaks_to_extract_then_invert(small_run):
    root, run = small_run
    res, _ = attack_run(root, "encoder.int8.tflite", "clone_rmle",
                        params={"budget": 3000, "epochs": 3, "iterations": 300, "n_eval": 32, "oracle_epochs": 0},
                        run=run)
    m = res.metrics  # measured: clone R^2 0.84, MSE 0.043 vs floor 0.087
    assert m["clone_feature_r2"] >= 0.75, m
    assert m["mse"] <= m["baseline_mse"] / 1.5, m
