"""Baseline defenses: noise variants, dropout, top-k, NoPeek, ARL, Shredder; parity with the device runtime."""

import math

import numpy as np
import pytest
import torch

from qdefend.config import DefenseConfig, RunConfig
from qdefend.data import Normalization
from qdefend.defenses import DEFENSES, StepContext, build_defense, resolved_params
from qdefend.defenses.arl import ARL, ssim_hinge
from qdefend.defenses.nopeek import bias_corrected_dcor2, distance_correlation
from qdefend.defenses.shredder import Shredder
from qdefend.edge import runtime
from qdefend.edge.release import STEP_TYPES, apply_release, topk_prune_torch as topk_prune
from qdefend.errors import QdefendError
from qdefend.image_metrics import ssim01

pytestmark = pytest.mark.usefixtures("one_thread")

Z_SHAPE = (8, 7, 7)


def stack(spec: str, **params):
    return build_defense(DefenseConfig(spec, params))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sigmoid_features(n=200, seed=0):
    return torch.rand((n, *Z_SHAPE), generator=gen(seed)) * 0.5 + 0.5  # [0.5, 1): no exact zeros


# ---------------------------------------------------------------------------------------------
# Distance correlation (NoPeek)


def test_dcor_is_one_for_identical_and_similar_inputs_and_scale_invariant():
    x = torch.randn(300, 6, generator=gen(1))
    z = torch.tanh(x @ torch.randn(6, 3, generator=gen(2)))
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(distance_correlation(x, 2.5 * x + 3.0)) == pytest.approx(1.0, abs=1e-6)
    d = float(distance_correlation(x, z))
    for c in (1e-2, 7.0, 300.0):
        assert float(distance_correlation(x, c * z)) == pytest.approx(d, rel=1e-4)
        assert float(distance_correlation(c * x, z)) == pytest.approx(d, rel=1e-4)
    assert float(bias_corrected_dcor2(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_dcor_near_zero_for_independent_and_sees_nonlinear_dependence():
    x, z = torch.randn(2000, 4, generator=gen(3)), torch.randn(2000, 4, generator=gen(4))
    assert float(distance_correlation(x, z)) < 0.12  # measured 0.085 (the V-statistic's bias)
    assert abs(float(bias_corrected_dcor2(x, z))) < 0.01
    assert float(distance_correlation(x, x ** 2)) > 0.3  # Pearson of x and x^2 is ~0
    # the V-statistic drifts to 1 in high dimension; the bias-corrected R* does not
    xi, zi = torch.randn(128, 1, 28, 28, generator=gen(5)), torch.rand((128, *Z_SHAPE), generator=gen(6))
    assert float(distance_correlation(xi, zi)) > 0.9
    assert abs(float(bias_corrected_dcor2(xi, zi))) < 0.05


def test_dcor_gradient_is_finite_even_for_constant_features():
    x = torch.randn(16, 5, generator=gen(7))
    for fn in (distance_correlation, bias_corrected_dcor2):
        for z0 in (torch.full((16, 3), 0.5), x[:, :3].clone()):
            z = z0.clone().requires_grad_(True)
            fn(x, z).backward()
            assert torch.isfinite(z.grad).all()


# ---------------------------------------------------------------------------------------------
# Release transforms and their runtime steps


def test_dropout_zero_fraction_no_rescaling_seeded():
    d = stack("dropout", dropout={"p": 0.3})
    z = sigmoid_features()
    out = d.release(z, gen(1))
    assert abs(float((out == 0).float().mean()) - 0.3) < 0.01
    kept = out != 0
    assert torch.equal(out[kept], z[kept])  # no 1/(1-p) rescaling
    assert torch.equal(out, d.release(z, gen(1)))
    assert torch.equal(stack("dropout", dropout={"p": 0.0}).release(z, gen(1)), z)
    assert d.release_spec() == {"steps": [{"type": "dropout", "p": 0.3}]}
    rt = apply_release(z.numpy(), d.release_spec()["steps"], np.random.default_rng(0))
    assert abs((rt == 0).mean() - 0.3) < 0.01
    np.testing.assert_array_equal(rt[rt != 0], z.numpy()[rt != 0])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9, 0.0])
def test_topk_zeroes_exactly_the_smallest_fraction_and_matches_the_runtime(ratio):
    z = torch.randn((64, *Z_SHAPE), generator=gen(2))  # signed: pruning is by |z|
    out = topk_prune(z, ratio).reshape(64, -1)
    flat = z.reshape(64, -1)
    k = int(round(ratio * flat.shape[1]))
    assert ((out == 0).sum(1) == k).all()
    if k:
        pruned_max = torch.where(out == 0, flat.abs(), torch.tensor(-math.inf)).amax(1)
        kept_min = torch.where(out != 0, flat.abs(), torch.tensor(math.inf)).amin(1)
        assert (pruned_max < kept_min).all()
    assert torch.equal(out[out != 0], flat[out != 0])
    spec = stack("topk", topk={"ratio": ratio}).release_spec()["steps"]
    assert spec == [{"type": "topk_prune", "ratio": ratio}]
    rt = apply_release(z.numpy(), spec, np.random.default_rng(0))
    np.testing.assert_array_equal(rt.reshape(64, -1), out.numpy())


def test_topk_after_dropout_matches_the_runtime_despite_tied_zeros():
    z = sigmoid_features(64)
    steps = stack("dropout+topk", dropout={"p": 0.3}, topk={"ratio": 0.5}).release_spec()["steps"]
    dropped = apply_release(z.numpy(), steps[:1], np.random.default_rng(3))
    np.testing.assert_array_equal(apply_release(dropped, steps[1:], np.random.default_rng(0)),
                                  topk_prune(torch.from_numpy(dropped), 0.5).numpy())
    # round-half-even like the runtime: 10 elements at ratio 0.25 -> 2 pruned
    z10 = torch.arange(1.0, 11.0).reshape(1, 10)
    assert int((topk_prune(z10, 0.25) == 0).sum()) == 2
    np.testing.assert_array_equal(apply_release(z10.numpy(), [{"type": "topk_prune", "ratio": 0.25}], None),
                                  topk_prune(z10, 0.25).numpy())


def _laplace_stats(noise: np.ndarray) -> tuple[float, float, float, float]:
    n = noise.astype(np.float64).ravel()
    return n.mean(), n.std(), np.abs(n).mean(), ((n - n.mean()) ** 4).mean() / n.var() ** 2


def test_laplace_release_statistics_match_the_runtime():
    d = stack("laplace", laplace={"scale": 0.2})
    z = torch.full((100_000, 4), 0.5)
    mean, std, mad, kurt = _laplace_stats((d.release(z, gen(4)) - z).numpy())
    assert abs(mean) < 0.003 and std == pytest.approx(0.2 * math.sqrt(2), rel=0.01)
    assert mad == pytest.approx(0.2, rel=0.01) and kurt == pytest.approx(6.0, rel=0.1)  # Gaussian: 3
    assert d.release_spec() == {"steps": [{"type": "laplace_noise", "scale": 0.2}]}
    rt = apply_release(z.numpy(), d.release_spec()["steps"], np.random.default_rng(0)) - z.numpy()
    r_mean, r_std, r_mad, r_kurt = _laplace_stats(rt)
    assert r_std == pytest.approx(std, rel=0.02) and r_mad == pytest.approx(mad, rel=0.02)
    assert torch.isfinite(d.release(torch.zeros(1_000_000), gen(5))).all()


def test_ldp_calibration_and_range_guard():
    lap = stack("ldp", ldp={"epsilon": 10.0})
    assert lap.release_spec() == {"steps": [{"type": "laplace_noise", "scale": 0.1}]}
    g = stack("ldp", ldp={"epsilon": 0.5, "mechanism": "gaussian", "delta": 1e-4})
    sigma = math.sqrt(2 * math.log(1.25 / 1e-4)) / 0.5
    assert g.release_spec()["steps"][0] == {"type": "gaussian_noise", "sigma": pytest.approx(sigma)}
    z = sigmoid_features(2000)
    assert float((g.release(z, gen(0)) - z).std()) == pytest.approx(sigma, rel=0.01)
    with pytest.raises(QdefendError, match="put ldp first"):
        stack("noise+ldp", noise={"sigma": 0.5}).release(z, gen(0))
    with pytest.raises(QdefendError, match="model.sigmoid"):
        stack("ldp").release(torch.randn(4, 3) - 5)


RELEASES = {
    "noise": {"sigma": 0.1}, "laplace": {"scale": 0.1}, "ldp": {"epsilon": 5.0},
    "dropout": {"p": 0.25}, "topk": {"ratio": 0.5},
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_release_spec_is_a_runtime_step_that_releases_like_torch(name):
    d = stack(name, **{name: RELEASES[name]})
    steps = d.release_spec()["steps"]
    assert len(steps) == 1 and steps[0]["type"] in STEP_TYPES
    z = sigmoid_features(500)
    t = d.release(z, gen(9)).numpy()
    r = apply_release(z.numpy(), steps, np.random.default_rng(9))
    assert r.shape == t.shape and r.dtype == np.float32
    # same transform, independent randomness: the same zero fraction and noise spread
    assert (r == 0).mean() == pytest.approx((t == 0).mean(), abs=0.01)
    assert (r - z.numpy()).std() == pytest.approx((t - z.numpy()).std(), rel=0.03, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in DEFENSES.names() if n != "none"])
def test_every_registered_defense_builds_with_defaults_and_keeps_the_shape(name):
    d = stack(f"noise+{name}" if name in ("cem", "cem-slot") else name)  # cem/cem-slot refuse to run without a noise floor
    z = sigmoid_features(8)
    assert d.release(z, gen(0)).shape == z.shape
    for step in d.release_spec()["steps"]:
        assert step["type"] in STEP_TYPES
    assert set(resolved_params(d)[name]) == set(d.defenses[-1].config_dict())


def test_composition_noise_nopeek():
    d = build_defense(DefenseConfig(stack="noise+nopeek", params={"noise": {"sigma": 0.05}, "nopeek": {"alpha": 2.0}}))
    assert d.names == ["noise", "nopeek"]
    assert d.release_spec() == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}
    assert resolved_params(d)["nopeek"] == {"alpha": 2.0, "estimator": "v", "eps": 1e-9}
    x = torch.randn(32, 1, 28, 28, generator=gen(1))
    z = torch.sigmoid(x[:, :, ::4, ::4].repeat(1, 8, 1, 1)).requires_grad_(True)
    terms = d.loss_terms(_ctx(x, z, d.release(z, gen(0))))
    assert set(terms) == {"nopeek/dcor"}
    assert terms["nopeek/dcor"].item() == pytest.approx(2.0 * distance_correlation(x, z.detach()).item(), rel=1e-6)
    terms["nopeek/dcor"].backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "spec, params, needle",
    [
        ("dropout", {"p": 1.0}, "defense.params.dropout.p=0.2"),
        ("dropout", {"p": -0.1}, "defense.params.dropout.p must be a finite number in [0, 1)"),
        ("topk", {"ratio": 1.0}, "defense.params.topk.ratio=0.5"),
        ("laplace", {"scale": -1.0}, "defense.params.laplace.scale="),
        ("ldp", {"epsilon": 0.0}, "defense.params.ldp.epsilon=10"),
        ("ldp", {"mechanism": "gauss"}, "mechanism must be one of laplace, gaussian"),
        ("ldp", {"delta": 1.0}, "defense.params.ldp.delta="),
        ("nopeek", {"alpha": -1.0}, "defense.params.nopeek.alpha=1.0"),
        ("nopeek", {"estimator": "w"}, "defense.params.nopeek.estimator=v"),
        ("arl", {"alpha": -0.5}, "defense.params.arl.alpha=1.0"),
        ("arl", {"tau": 1.5}, "defense.params.arl.tau=0.5"),
        ("arl", {"steps": 0}, "defense.params.arl.steps=2"),
        ("shredder", {"alpha": -1.0}, "defense.params.shredder.alpha=0.1"),
        ("shredder", {"n_tensors": 0}, "defense.params.shredder.n_tensors=8"),
        ("noise", {"sigma": float("nan")}, "--set defense.params.noise.sigma="),
        ("topk", {"rate": 0.5}, "Valid keys of [defense.params.topk]: ratio"),
    ],
)
def test_bad_configs_fail_at_construction_with_the_fix(spec, params, needle):
    with pytest.raises(QdefendError) as e:
        stack(spec, **{spec: params})
    assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# ARL

NORM = Normalization((0.286,), (0.353,))


def _ctx(x, z, zr, epoch=1, x01=False):
    return StepContext(x=x, y=torch.zeros(len(x), dtype=torch.long), z=z, z_released=zr, logits=None,
                       epoch=epoch, step=0, encoder=None, head=None, normalization=None if x01 else NORM)


def _images(n=16, seed=0):
    """Smooth [0,1] images (blurred noise), so SSIM has structure to find."""
    x = torch.rand((n, 1, 7, 7), generator=gen(seed))
    return torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)


def test_ssim_hinge_is_zero_below_tau_and_one_minus_tau_for_a_perfect_reconstruction():
    x01 = _images()
    other = _images(seed=1).requires_grad_(True)
    assert float(ssim01(other.detach(), x01)) < 0.5
    h = ssim_hinge(other, x01, 0.5)
    assert h.item() == 0.0
    h.backward()
    assert float(other.grad.abs().sum()) == 0.0  # no gradient below the threshold
    assert float(ssim_hinge(x01, x01, 0.5)) == pytest.approx(0.5, abs=1e-5)
    assert float(ssim_hinge(x01, x01, 0.0)) == pytest.approx(1.0, abs=1e-5)


def test_arl_trains_its_decoder_and_penalises_only_the_encoder():
    torch.manual_seed(0)
    d = stack("arl", arl={"alpha": 2.0, "tau": 0.0, "steps": 3, "warmup_epochs": 1, "width": 4})
    arl = d.defenses[0]
    x01 = _images(16)
    x = NORM.apply(x01)
    z = torch.rand((16, *Z_SHAPE), generator=gen(2)).requires_grad_(True)
    assert d.module() is not None and not arl.attacker.built
    assert d.release(z) is z and d.release_spec() == {"steps": []}
    warm = d.loss_terms(_ctx(x, z, z, epoch=0))
    assert float(warm["arl/ssim_hinge"]) == 0.0 and arl.attacker.built
    w0 = [p.detach().clone() for p in arl.attacker.decoder.parameters()]
    terms = d.loss_terms(_ctx(x, z, z, epoch=1))
    assert any(not torch.equal(a, b) for a, b in zip(w0, arl.attacker.decoder.parameters()))
    term = terms["arl/ssim_hinge"]
    with torch.no_grad():
        s = float(ssim01(arl.attacker.decoder(z), x01))
    assert term.item() == pytest.approx(2.0 * max(s, 0.0), abs=1e-4)
    for p in arl.attacker.decoder.parameters():
        p.grad = None
    term.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in arl.attacker.decoder.parameters())
    assert set(arl.on_epoch_end(None)) == {"attacker_ssim"}


def test_arl_decoder_round_trips_through_a_state_dict():
    a = ARL(ARL.Config(width=4))
    z, x01 = torch.rand((4, *Z_SHAPE), generator=gen(3)), _images(4)
    a.train_attacker(z, x01)
    sd = {k: v.clone() for k, v in a.module().state_dict().items()}
    b = ARL(ARL.Config(width=4))
    b.module().load_state_dict(sd)  # rebuilt from the saved shapes, then loaded
    a.module().eval(), b.module().eval()
    assert torch.equal(a.attacker.decoder(z), b.attacker.decoder(z))
    with pytest.raises(QdefendError, match="was built for shapes"):
        b.train_attacker(torch.rand(4, 4, 7, 7), x01)


def test_arl_adam_moments_survive_a_checkpoint(tmp_path):
    """A resumed ARL run continues the attacker's Adam exactly (moments and step count kept)."""
    from qdefend.checkpoint import load_checkpoint, save_checkpoint

    z, x01 = torch.rand((4, *Z_SHAPE), generator=gen(3)), _images(4)
    a = stack("arl", arl={"width": 4})
    a.defenses[0].train_attacker(z, x01)
    save_checkpoint(tmp_path, 1, {"defense": a.module().state_dict()}, None, {},
                    extra_optimizers=a.optimizer_states())
    parts, _, state = load_checkpoint(tmp_path)
    assert set(state["extra_optimizers"]) == {"arl"}
    b = stack("arl", arl={"width": 4})
    b.module().load_state_dict(parts["defense"])
    b.load_optimizer_states(state["extra_optimizers"])
    assert b.optimizer_states()["arl"] is state["extra_optimizers"]["arl"]  # pending until built
    fresh = stack("arl", arl={"width": 4})
    fresh.module().load_state_dict(parts["defense"])
    for d in (a, b, fresh):
        d.defenses[0].train_attacker(z, x01)
    pa, pb, pf = (list(d.module().parameters()) for d in (a, b, fresh))
    assert all(torch.equal(u, v) for u, v in zip(pa, pb))
    assert any(not torch.equal(u, v) for u, v in zip(pa, pf))  # without the moments it differs


# ---------------------------------------------------------------------------------------------
# Shredder


def test_shredder_adds_one_learned_tensor_per_sample_and_exports_it():
    d = stack("shredder", shredder={"n_tensors": 3, "init_scale": 0.2})
    sh = d.defenses[0]
    z = sigmoid_features(64)
    out = d.release(z, gen(0))
    bank = sh.bank.noise.detach()
    diffs = (out - z).reshape(64, 1, -1)
    match = (diffs - bank.reshape(1, 3, -1)).abs().amax(-1) < 1e-6
    assert (match.sum(1) == 1).all() and len(set(match.float().argmax(1).tolist())) == 3
    assert float(bank.abs().mean()) == pytest.approx(0.2, rel=0.15)  # Laplace(0, 0.2) init
    (step,) = d.release_spec()["steps"]
    assert step["type"] == "additive_noise" and np.asarray(step["tensors"]).shape == (3, 392)
    rt = apply_release(z.numpy(), [step], np.random.default_rng(0))
    r_diffs = (rt - z.numpy()).reshape(64, 1, -1)
    assert (np.abs(r_diffs - bank.numpy().reshape(1, 3, -1)).max(-1) < 1e-6).sum(1).tolist() == [1] * 64


def test_shredder_single_tensor_release_equals_the_proposed_runtime_step(monkeypatch):
    d = stack("shredder", shredder={"n_tensors": 1})
    z = sigmoid_features(16)
    t = d.release(z).numpy()
    r = apply_release(z.numpy(), d.release_spec()["steps"], np.random.default_rng(0))
    np.testing.assert_allclose(r, t, atol=1e-7)
    assert runtime.apply_release is apply_release  # the runtime applies the one table


def test_shredder_learns_only_inside_training_and_reloads():
    torch.manual_seed(0)
    d = stack("shredder", shredder={"n_tensors": 2, "alpha": 1.0, "lr": 0.05})
    sh = d.defenses[0]
    z = sigmoid_features(32)
    head = torch.nn.Linear(392, 3)
    y = torch.randint(3, (32,), generator=gen(1))

    def trainer_step():
        zr = d.release(z, gen(0))
        terms = d.loss_terms(_ctx(torch.zeros(32, 1, 28, 28), z, zr))
        loss = torch.nn.functional.cross_entropy(head(zr.flatten(1)), y) + sum(terms.values())
        loss.backward()
        return terms["shredder/magnitude"]

    trainer_step()
    n0 = float(sh.bank.noise.detach().abs().mean())
    for _ in range(20):
        trainer_step()
    assert sh.on_epoch_end(None)["noise_abs_mean"] > n0 + 0.05  # the reward grew the noise
    # an attack back-propagating through release (no loss_terms) never changes the bank
    before = sh.bank.noise.detach().clone()
    for _ in range(3):
        head(d.release(z, gen(0)).flatten(1)).sum().backward()
    assert torch.equal(sh.bank.noise.detach(), before)
    fresh = Shredder(sh.config)
    fresh.module().load_state_dict(sh.module().state_dict())
    assert torch.equal(fresh.bank.noise.detach(), before)


# ---------------------------------------------------------------------------------------------
# Training loop


def _tiny_run_cfg(defense: dict, epochs=1, **train) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"limit_train": 512, "limit_test": 256, "val_size": 256, "aux_size": 256},
        "model": {"width": 0.25, "head_width": 0.25},
        "quant": {"scheme": "none"},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, **train},
        "defense": defense,
    })


def test_trainer_runs_noise_plus_nopeek(tmp_path):
    from qdefend.run import RunPaths, load_run
    from qdefend.train import Trainer

    cfg = _tiny_run_cfg({"stack": "noise+nopeek", "params": {"noise": {"sigma": 0.05}, "nopeek": {"alpha": 0.5}}})
    rec = Trainer(cfg, tmp_path / "r").fit()
    (ep,) = [r for r in RunPaths(tmp_path / "r").read_metrics() if r["event"] == "epoch"]
    assert 0 < ep["train_nopeek/dcor"] <= 0.5  # alpha * dCor, dCor in (0, 1]
    assert ep["train_loss"] < math.log(10)  # learning: below the loss of a uniform guess (measured 2.17)
    assert 0 <= rec["test_acc_float"] <= 1
    run = load_run(tmp_path / "r")
    assert run.defense.names == ["noise", "nopeek"]
    assert run.cfg.defense.params["nopeek"] == {"alpha": 0.5, "estimator": "v", "eps": 1e-9}


@pytest.mark.slow
def test_trainer_runs_arl_and_shredder_and_reloads_their_state(tmp_path):
    from qdefend.run import RunPaths, load_run
    from qdefend.train import Trainer

    cfg = _tiny_run_cfg({"stack": "arl", "params": {"arl": {"warmup_epochs": 1, "width": 4}}}, epochs=2)
    Trainer(cfg, tmp_path / "arl").fit()
    eps = [r for r in RunPaths(tmp_path / "arl").read_metrics() if r["event"] == "epoch"]
    assert eps[0]["train_arl/ssim_hinge"] == 0.0 and 0 < eps[1]["hook_arl/attacker_ssim"] < 1
    assert load_run(tmp_path / "arl").defense.defenses[0].attacker.built

    Trainer(_tiny_run_cfg({"stack": "noise"}), tmp_path / "base").fit()
    sh = _tiny_run_cfg({"stack": "shredder", "params": {"shredder": {"alpha": 1.0}}}, freeze="network")
    sh.init_from = str(tmp_path / "base")
    Trainer(sh, tmp_path / "sh").fit()
    (ep,) = [r for r in RunPaths(tmp_path / "sh").read_metrics() if r["event"] == "epoch"]
    assert ep["hook_shredder/noise_abs_mean"] > 0.1  # grew from the 0.1 initial scale
    run = load_run(tmp_path / "sh")
    assert run.defense.release_spec()["steps"][0]["type"] == "additive_noise"
    # the paper's setting: the network is frozen (weights AND BatchNorm running statistics)
    base = load_run(tmp_path / "base", "best")
    for part in ("encoder", "head"):
        want, got = getattr(base.net, part).state_dict(), getattr(run.net, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), part


def test_freeze_needs_a_trained_run_and_something_to_train(tmp_path):
    from qdefend.train import Trainer

    with pytest.raises(QdefendError, match="needs trained ones: add --from"):
        Trainer(_tiny_run_cfg({"stack": "shredder"}, freeze="network"), tmp_path / "a").fit()
    with pytest.raises(QdefendError, match="train.freeze must be one of none, encoder, head, network, got 'all'"):
        _tiny_run_cfg({"stack": "none"}, freeze="all")
    Trainer(_tiny_run_cfg({"stack": "none"}, epochs=1), tmp_path / "base").fit()
    cfg = _tiny_run_cfg({"stack": "noise"}, freeze="network")
    cfg.init_from = str(tmp_path / "base")
    with pytest.raises(QdefendError, match="nothing to train"):
        Trainer(cfg, tmp_path / "b").fit()
