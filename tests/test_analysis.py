"""Partition analysis: R_c^2 and the GPZ locator, the entropy estimate, layer KL, and the pipeline."""

import json
import math

import numpy as np
import pytest
import torch

from qdefend.analysis import entropy as ent
from qdefend.analysis import partition as part
from qdefend.analysis.radius import RadiusAccumulator, class_radius, locate_zone, relative_drops
from qdefend.analysis.similarity import channel_kl, neighbour_kl, pooled_channel_kl
from qdefend.errors import QdefendError

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- R_c^2


def test_radius_exact_on_hand_example():
    # class 0: (0,0),(2,0) -> mu (1,0), sq. distances 1,1 -> 1; class 1: (0,0),(0,4) -> mu (0,2) -> 4,4 -> 4
    f = np.array([[0, 0], [2, 0], [0, 0], [0, 4]], np.float32)
    y = np.array([0, 0, 1, 1])
    assert class_radius(f, y) == pytest.approx(2.5)
    acc = RadiusAccumulator(2)
    acc.update(f[:3], y[:3])
    acc.update(f[3:], y[3:])
    assert acc.per_class() == pytest.approx([1.0, 4.0])
    assert acc.value() == pytest.approx(2.5)


def test_radius_tight_clusters_small_spread_large():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0]])
    tight = centres[y] + 0.01 * torch.randn(200, 2, generator=g)
    spread = centres[y] + 3.0 * torch.randn(200, 2, generator=g)
    assert class_radius(tight, y) < 1e-3 < 10 < class_radius(spread, y)


def test_streaming_accumulator_equals_direct_formula():
    g = torch.Generator().manual_seed(1)
    f = 5 + torch.randn(301, 3, 4, 4, generator=g)  # offset: the q/N - ||mu||^2 form must not cancel badly
    y = torch.randint(0, 4, (301,), generator=g)
    y[y == 3] = 2  # class 3 never seen: ignored, reported NaN
    acc = RadiusAccumulator(4)
    for i in range(0, 301, 64):
        acc.update(f[i:i + 64], y[i:i + 64])
    pc = acc.per_class()
    for c in range(3):
        fc = f[y == c].flatten(1).double()
        assert pc[c] == pytest.approx(float(((fc - fc.mean(0)) ** 2).sum(1).mean()), rel=1e-9)
    assert math.isnan(pc[3])
    assert acc.value() == pytest.approx(class_radius(f, y, 4), rel=1e-9)


# ----------------------------------------------------------------------------- zone locator


def test_relative_drops_values():
    assert relative_drops([10, 5, 5, 6, 0]) == pytest.approx([0.5, 0.0, -0.2, 1.0])
    assert relative_drops([0, 1]) == [0.0]


def test_zone_starts_after_largest_drop_and_runs_while_flat():
    z = locate_zone([10, 9, 8.5, 2, 1.9, 1.8])
    assert (z.primary.start, z.primary.end) == (3, 5)
    assert z.primary.drop == pytest.approx(1 - 2 / 8.5)
    assert z.second is None  # the second-largest drop (0.1) is below the 0.2 threshold: no transition


def test_second_zone_rule():
    isolated = locate_zone([10, 5, 4.8, 4.7, 1, 0.95])  # drops .5, .04, .02, .79, .05
    assert (isolated.primary.start, isolated.primary.end) == (4, 5)
    assert isolated.second is not None and (isolated.second.start, isolated.second.end) == (1, 3)
    assert locate_zone([10, 5, 1, 0.9]).second is None  # adjacent drops: one transition
    assert locate_zone([10, 5, 3.5, 1, 0.9]).second is None  # a 0.3 drop between: not isolated
    rising = locate_zone([1, 2, 3, 4])
    assert rising.second is None and rising.notes  # no drop at all: said so


def test_zone_locator_refuses_bad_curves():
    with pytest.raises(QdefendError, match=">= 2"):
        locate_zone([1.0])
    with pytest.raises(QdefendError, match="non-finite"):
        locate_zone([1.0, float("nan")])


# ----------------------------------------------------------------------------- KL


def test_kl_zero_for_identical_and_grows_with_perturbation():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 8, 5, 5, generator=g)
    kls = [channel_kl(a, a + s * torch.randn(a.shape, generator=g)) for s in (0.0, 0.1, 0.5, 2.0)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)
    assert kls[0] < kls[1] < kls[2] < kls[3]
    nb = [neighbour_kl(a, a + s * torch.randn(a.shape, generator=g)) for s in (0.0, 0.5, 2.0, 8.0)]
    assert nb[0] == pytest.approx(0.0, abs=1e-9)
    assert nb[0] < nb[1] < nb[2] < nb[3]
    assert neighbour_kl(a, 3 * a) == pytest.approx(0.0, abs=1e-9)  # scale-free
    assert pooled_channel_kl(a, a[:, :4]) is None  # other channel count: undefined
    assert pooled_channel_kl(a, torch.nn.functional.avg_pool2d(a, 5)) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- entropy


def test_bound_formula_recovers_isotropic_variance():
    d, v = 50, 0.02
    h = d / 2 * math.log(2 * math.pi * math.e * v)  # entropy of N(0, v I_d)
    assert ent.mse_lower_bound(h, d) == pytest.approx(v)
    assert ent.gaussian_entropy(np.eye(d) * v, jitter=0.0) == pytest.approx(h)
    assert ent.mse_lower_bound(float("-inf"), d) == 0.0


def test_channel_info_matches_logdet_and_gram_route():
    g = torch.Generator().manual_seed(3)
    for n, dz in ((200, 12), (20, 60)):  # covariance route and Gram route
        z = torch.randn(n, dz, generator=g) @ torch.randn(dz, dz, generator=g)
        cov = np.cov(z.numpy().astype(np.float64), rowvar=False)
        want = 0.5 * np.linalg.slogdet(np.eye(dz) + cov / 0.3**2)[1]
        assert ent.gaussian_channel_info(z, 0.3) == pytest.approx(want, rel=1e-6)


def test_entropy_estimate_monotone_in_sigma():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(300, 1, 6, 6, generator=g)
    acc = ent.MomentAccumulator()
    acc.update(x[:100])
    acc.update(x[100:])
    assert acc.covariance() == pytest.approx(np.cov(x.flatten(1).double().numpy(), rowvar=False))
    h_x = ent.gaussian_entropy(acc.covariance())
    z = x.flatten(1) @ torch.randn(36, 16, generator=g)
    ests = [ent.estimate_entropy(h_x, z, s, 36) for s in (0.01, 0.1, 1.0, 100.0)]
    infos = [e.info for e in ests]
    bounds = [e.bound for e in ests]
    assert infos == sorted(infos, reverse=True) and bounds == sorted(bounds)
    assert bounds[-1] == pytest.approx(ent.mse_lower_bound(h_x, 36), rel=1e-3)  # noise drowns z: bound -> h(x)'s
    zero = ent.estimate_entropy(h_x, z, 0.0, 36)
    assert zero.vacuous and zero.bound == 0.0 and "vacuous" in zero.note
    assert "estimate" in ests[0].note
    json.dumps(zero.to_dict(), allow_nan=False)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, needle", [
    ({"epochs": 0}, "--epochs 1"),
    ({"sigma": -0.1}, "--sigma 0.1"),
    ({"width": 0}, "--width 0.5"),
    ({"zone_labels": "guessed"}, "zone_labels='predicted'"),
    ({"flat": 1.5}, "flat=0.2"),
    ({"limit_eval": 1}, "--limit-eval"),
    ({"model": "vgg99"}, "Valid models: "),
    ({"dataset": "svhn"}, "Valid datasets: "),
    ({"decoder": {"epochs": 0}}, "--set epochs="),
    ({"from_run": "/nonexistent/run"}, "not a run directory"),
])
def test_bad_config_fails_at_construction(kw, needle):
    with pytest.raises(QdefendError) as e:
        part.PartitionConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- end to end

TINY = dict(model="vgg11_bn", width=0.125, limit_train=256, limit_eval=96, entropy_samples=64, similarity_samples=32)
TINY_DECODER = {"epochs": 1, "aux_size": 128, "n_eval": 32, "batch_size": 32, "width": 4,
                "keep_images": 4}


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("partition")
    cfg = part.PartitionConfig(**TINY, sigma=0.1, attack=True, decoder=TINY_DECODER, out=str(out))
    return part.analyze_partition(cfg, progress=False), out


@pytest.mark.slow
def test_analyze_partition_end_to_end(tiny_result):
    res, out = tiny_result
    rows = res["cuts"]
    assert [r["cut"] for r in rows] == list(range(1, 9))
    assert all(r["r2_true"] > 0 and r["r2_pred"] > 0 for r in rows)
    macs = [r["macs"] for r in rows]
    assert macs == sorted(macs) and rows[0]["params"] == rows[0]["int8_bytes"] > 0
    zone = res["zone"]["primary"]
    assert 2 <= zone["start_cut"] <= zone["end_cut"] <= 8
    assert sum(r["zone"] == "GPZ" for r in rows) == zone["end_cut"] - zone["start_cut"] + 1
    for r in rows:
        assert 0 < r["attack"]["mse"] < 1 and r["mse_bound"] > 0 and not r["entropy"]["vacuous"]
        assert r["loose"] == (r["mse_bound"] > r["attack"]["mse"])
        assert r["kl_float_int8"] >= 0
    assert all(r["kl_next"] >= 0 for r in rows[:-1]) and rows[-1]["kl_next"] is None
    assert res["baseline"]["mse"] > 0 and res["resolved"]["sigma"] == 0.1
    saved = json.loads((out / "partition.json").read_text())
    assert saved["cuts"][3]["r2_pred"] == pytest.approx(rows[3]["r2_pred"])
    for f in ("partition.png", "reconstructions.png", "model/config.toml"):
        assert (out / f).is_file()
    from PIL import Image

    with Image.open(out / "partition.png") as im:
        assert im.size[0] > 500 and im.size[1] >= 3 * 250  # R^2, MSE and KL panels


@pytest.mark.slow
def test_cli_partition_reuses_model_and_prints_table(tiny_result, capsys, monkeypatch):
    from qdefend.cli import main

    _, out = tiny_result
    monkeypatch.setattr(part, "DECODER_BUDGET", {**part.DECODER_BUDGET, **TINY_DECODER})
    argv = ["partition", "--model", "vgg11_bn", "--width", "0.125", "--limit-train", "256", "--limit-eval", "96",
            "--sigma", "0", "--attack", "--no-similarity", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "train: done already, skipped" in text and "Golden Partition Zone" in text
    assert "vacuous" in text and "attack MSE" in text
    res = json.loads((out / "partition.json").read_text())
    assert res["timings"]["train_s"] < 5 and res["cuts"][0]["kl_float_int8"] is None


def test_cli_partition_user_mistakes(tmp_path, capsys):
    from qdefend.cli import main

    assert main(["partition", "--model", "vgg99", "--out", str(tmp_path)]) == 2
    assert "Valid models:" in capsys.readouterr().err
    assert main(["partition", "--from", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_from_run_loads_and_freezes_the_edge(tmp_path):
    from qdefend.checkpoint import load_checkpoint
    from qdefend.config import RunConfig
    from qdefend.run import load_run
    from qdefend.train import Trainer

    src = tmp_path / "src"
    cfg = RunConfig.from_dict({"model": {"name": "vgg11_bn", "cut": 2, "width": 0.125},
                               "data": {"limit_train": 128, "limit_test": 64, "val_size": 256, "aux_size": 256},
                               "defense": {"stack": "noise", "params": {"noise": {"sigma": 0.05}}},
                               "train": {"epochs": 1, "batch_size": 64}})
    Trainer(cfg, src, progress=False).fit()
    pcfg = part.PartitionConfig(from_run=str(src), limit_train=128, limit_eval=64, entropy_samples=32,
                                similarity=False, out=str(tmp_path / "p"))
    res = part.analyze_partition(pcfg, progress=False)
    assert res["resolved"]["sigma"] == 0.05 and res["resolved"]["from_cut"] == 2  # the run's noise
    assert [r["from_run"] for r in res["cuts"][:3]] == [True, True, False]
    theirs, _, _ = load_checkpoint(src / "checkpoints", "best", with_optimizer=False)
    mine = load_run(tmp_path / "p" / "model").net.encoder.state_dict()
    for key in ("stage1.0.weight", "stage2.1.running_mean", "stage2.1.running_var", "stage2.1.bias"):
        assert torch.equal(mine[key], theirs["encoder"][key]), key  # loaded, then frozen through training
    with pytest.raises(QdefendError, match="drop --width"):
        part.analyze_partition(part.PartitionConfig(from_run=str(src), width=0.5, out=str(tmp_path / "q")))


def test_line_plot_draws_every_panel_and_skips_missing_points(tmp_path):
    from PIL import Image

    from qdefend.analysis.plot import Panel, Series, line_plot

    xs = [1, 2, 3, 4]
    panels = [Panel("radius", "R", [Series("R_c^2", [0.5, None, 0.3, 0.2])], spans=[(2, 3, "GPZ")]),
              Panel("MSE", "MSE", [Series("int8", [0.01, 0.02, float("nan"), 0.04], dashed=True)], log_y=True)]
    path = line_plot(xs, panels, tmp_path / "p.png", xticklabels=["a", "b", "c", "d"])
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[:2] == (600, 760)  # two 300-pixel panels
    top, bottom = img[:300], img[300:]
    assert (top == (31, 119, 180)).all(-1).sum() > 20 and (bottom == (31, 119, 180)).all(-1).sum() > 20
    assert (img == (255, 243, 205)).all(-1).sum() > 1000  # the shaded span


def test_scatter_plot_draws_the_finite_points_with_error_bars(tmp_path):
    from PIL import Image

    from qdefend.analysis.plot import scatter_plot

    def marker_pixels(path):
        img = Image.open(path).convert("RGB")
        return img.size, int((np.asarray(img) == (31, 119, 180)).all(-1).sum())

    size, two = marker_pixels(scatter_plot([("none", 0.02, 0.9), ("noise", 0.05, 0.85), ("bad", float("nan"), 0.5)],
                                      tmp_path / "p.png", size=(400, 300)))
    assert size == (400, 300)
    _, one = marker_pixels(scatter_plot([("none", 0.02, 0.9)], tmp_path / "one.png", size=(400, 300)))
    _, none = marker_pixels(scatter_plot([("bad", float("nan"), 0.5)], tmp_path / "none.png", size=(400, 300)))
    assert none == 0 and one > 20 and 1.5 * one < two < 2.5 * one  # two markers drawn, the NaN one not
    _, bars = marker_pixels(scatter_plot([("a", 0.02, 0.9, 0.002, 0.01)], tmp_path / "err.png", size=(400, 300)))
    assert bars > 20  # with seed error bars
    scatter_plot([], tmp_path / "empty.png")


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes(tmp_path):
    from PIL import Image

    from qdefend.analysis.plot import pareto_front, scatter_plot

    pts = [(0.010, 0.89), (0.012, 0.88), (0.011, 0.87), (0.030, 0.80), (0.030, 0.80), (float("nan"), 0.99),
           (0.009, 0.89)]
    # (0.011, 0.87) loses to (0.012, 0.88); (0.009, 0.89) to (0.010, 0.89); the tied pair both stay
    assert pareto_front(pts) == [0, 1, 3, 4]
    assert pareto_front([]) == []
    red = lambda path: int((np.asarray(Image.open(path).convert("RGB")) == (214, 39, 40)).all(-1).sum())  # noqa: E731
    labelled = [(str(i), x, y) for i, (x, y) in enumerate(pts)]
    assert red(scatter_plot(labelled, tmp_path / "f.png", front=True)) > 30
    assert red(scatter_plot(labelled, tmp_path / "n.png")) == 0


def test_aggregate_seeds_means_sample_std_and_drops_partial_keys():
    from qdefend.analysis.seeds import aggregate_seeds, mean_pm

    rows = [{"config": "a", "seed": 0, "acc": 0.80, "mse": 0.01, "note": "x", "gap": None},
            {"config": "b", "seed": 0, "acc": 0.70, "mse": float("nan")},
            {"config": "a", "seed": 1, "acc": 0.84, "mse": 0.03, "note": "y", "gap": 1.0},
            {"config": "a", "seed": 2, "acc": 0.82, "mse": 0.02, "note": "z", "gap": 2.0}]
    a, b = aggregate_seeds(rows, by=("config",))
    assert a["config"] == "a" and a["seeds"] == [0, 1, 2] and b["seeds"] == [0]
    assert a["acc"] == pytest.approx(0.82) and a["acc_std"] == pytest.approx(0.02)  # n - 1 in the denominator
    assert a["mse"] == pytest.approx(0.02) and a["mse_std"] == pytest.approx(0.01)
    # a text field, and a key one seed lacks, are not averaged over the seeds that have them
    assert "note" not in a and "gap" not in a and "mse" not in b
    assert b["acc"] == 0.70 and b["acc_std"] is None  # one seed: no spread
    assert mean_pm(a, "acc", ".2f", 100) == "82.00 ± 2.00" and mean_pm(b, "acc", ".1f", 100) == "70.0"
    assert mean_pm(b, "mse", ".4f") == "-"
    # explicit keys; the seed field may be absent (counted as seed 0)
    (c,) = aggregate_seeds([{"config": "c", "acc": True, "mse": 1}], by=("config",), keys=("acc", "mse"))
    assert c == {"config": "c", "seeds": [0], "mse": 1.0, "mse_std": None}  # a bool is not a number
