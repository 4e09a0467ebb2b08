"""CEM defense: the log hinge on hand-computed inputs, k-means / GMM statistics, the lambda schedule,
the optimisation order (encoder-only gradients), config errors, checkpointing, and a tiny training run.

CEM is registered as "cem"; its training tests run `noise+cem` through the Trainer.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdefend.checkpoint import load_checkpoint, save_checkpoint
from qdefend.data import Split
from qdefend.defenses import DefenseStack, StepContext
from qdefend.defenses.cem import CEM, CEMConfig, fit_diag_gmm, kmeans
from qdefend.defenses.noise import GaussianNoise, NoiseConfig
from qdefend.errors import QdefendError

pytestmark = pytest.mark.usefixtures("one_thread")


def _set_stats(cem, centroids, weights, vbar, count):
    s = cem.stats
    s.centroids = torch.tensor(centroids, dtype=torch.float32)
    s.weights = torch.tensor(weights, dtype=torch.float32)
    s.vbar = torch.tensor(vbar, dtype=torch.float32)
    s.class_count = torch.tensor(count, dtype=torch.float32)


def _two_class_stats(cem):
    # class 0: clusters at (0,0) and (10,10); class 1: one cluster at (5,-5), slot 1 empty (w = 0)
    _set_stats(cem, [[[0, 0], [10, 10]], [[5, -5], [-5, 5]]], [[0.5, 0.5], [1.0, 0.0]],
               [[0.5, 0.001], [0.002, 0.0]], [100, 100])


# ------------------------------------------------------------------------------ the hinge

def test_hinge_is_exactly_zero_under_the_noise_floor():
    cem = CEM(CEMConfig(sigma=0.4, schedule="constant"))  # floor = 0.125 * 0.16 = 0.02
    _set_stats(cem, [[[0, 0], [10, 10]]], [[0.5, 0.5]], [[0.01, 0.019]], [100])
    z = torch.tensor([[0.1, -0.1], [10.1, 9.9], [0.0, 0.05]], requires_grad=True)
    h = cem.hinge(z, torch.zeros(3, dtype=torch.long))
    assert h.item() == 0.0
    h.backward()
    assert torch.count_nonzero(z.grad) == 0


def test_hinge_matches_a_hand_computed_value():
    cem = CEM(CEMConfig(sigma=0.4, schedule="constant", lam=2.0))
    _two_class_stats(cem)
    # class 0: (1,1), (-1,-1) -> cluster 0, vhat = 1, rho = 10 * 2 / (0.5 * 100) = 0.4, v = 0.4 + 0.6 * 0.5
    # cluster (0,1) is not in the batch: rho = 0, v = vbar = 0.001 < floor -> 0
    # class 1: (-5,5) lies on the empty slot but must go to the only real cluster: sq = 100,
    # rho = 10 * 1 / 100 = 0.1, v = 0.1 * 100 + 0.9 * 0.002
    z = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [-5.0, 5.0]])
    y = torch.tensor([0, 0, 1])
    g, floor = 0.01, 0.125 * 0.4 ** 2
    t00 = 0.5 * (math.log(0.7 + g) - math.log(floor + g))
    t10 = 1.0 * (math.log(10.0018 + g) - math.log(floor + g))
    expected = (t00 + t10) / 2
    assert cem.hinge(z, y).item() == pytest.approx(expected, rel=1e-5)
    ctx = SimpleNamespace(z=z, y=y, epoch=1)  # second epoch: the term is on
    assert cem.encoder_loss_terms(ctx)["loss"].item() == pytest.approx(2.0 * expected, rel=1e-5)
    assert cem.encoder_loss_terms(SimpleNamespace(z=z, y=y, epoch=0)) == {}  # first epoch: off
    coupled = CEM(CEMConfig(sigma=0.4, lam=2.0))  # schedule "lr": lambda * 0.001 / lr
    _two_class_stats(coupled)
    term = coupled.encoder_loss_terms(SimpleNamespace(z=z, y=y, epoch=1, lr=0.01))["loss"]
    assert term.item() == pytest.approx(2.0 * 0.1 * expected, rel=1e-5)


def test_no_term_without_statistics_or_for_classes_without_clusters():
    cem = CEM(CEMConfig(sigma=0.1, schedule="constant"))
    z, y = torch.rand(4, 2), torch.tensor([0, 0, 1, 1])
    assert cem.hinge(z, y) is None and cem.encoder_loss_terms(SimpleNamespace(z=z, y=y, epoch=3)) == {}
    _set_stats(cem, [[[0, 0]], [[1, 1]], [[2, 2]]], [[1.0], [1.0], [0.0]], [[0.5], [0.5], [0.0]], [10, 10, 0])
    assert cem.hinge(z, torch.tensor([2, 2, 2, 2])) is None


# ------------------------------------------------------------------------------ statistics

def _blobs(gen, centers, stds, ns):
    return torch.cat([torch.tensor(c) + torch.randn(n, len(c), generator=gen) * torch.tensor(s, dtype=torch.float32)
                      for c, s, n in zip(centers, stds, ns)])


def test_kmeans_statistics_recover_two_clusters():
    g = torch.Generator().manual_seed(0)
    z0 = _blobs(g, [[0.0, 0.0], [4.0, 4.0]], [[0.1, 0.1], [0.3, 0.3]], [200, 100])
    z1 = _blobs(g, [[-3.0, 2.0], [2.0, -3.0]], [[0.2, 0.2], [0.2, 0.2]], [150, 150])
    z = torch.cat([z0, z1]).view(-1, 2, 1, 1)  # the fit flattens feature maps
    y = torch.tensor([0] * 300 + [1] * 300)
    cem = CEM(CEMConfig(clusters=2, sigma=0.1))
    d = cem.fit(z, y, 2)
    s = cem.stats
    order0 = s.centroids[0, :, 0].argsort()
    torch.testing.assert_close(s.centroids[0, order0], torch.tensor([[0.0, 0.0], [4.0, 4.0]]), atol=0.06, rtol=0)
    torch.testing.assert_close(s.weights[0, order0], torch.tensor([2 / 3, 1 / 3]))
    # k-means finds the exact partition, so vbar is each blob's spread around its own mean
    blob_var = torch.stack([(b - b.mean(0)).square().mean() for b in (z0[:200], z0[200:])])
    torch.testing.assert_close(s.vbar[0, order0], blob_var)
    torch.testing.assert_close(blob_var, torch.tensor([0.01, 0.09]), rtol=0.2, atol=0)
    order1 = s.centroids[1, :, 0].argsort()
    torch.testing.assert_close(s.centroids[1, order1], torch.tensor([[-3.0, 2.0], [2.0, -3.0]]), atol=0.06, rtol=0)
    assert s.class_count.tolist() == [300.0, 300.0]
    assert d["clusters"] == 4.0 and d["above_floor"] == 1.0  # all variances above 0.125 * 0.01
    # the lone-feature kmeans helper: a far init converges to the blob means too
    c, lab = kmeans(z0, torch.tensor([[1.0, 1.0], [3.0, 3.0]]), 50)
    torch.testing.assert_close(c, torch.tensor([[0.0, 0.0], [4.0, 4.0]]), atol=0.06, rtol=0)
    assert torch.bincount(lab).tolist() == [200, 100]


def test_gmm_variances_match_the_truth():
    g = torch.Generator().manual_seed(1)
    var_a, var_b = [0.01, 0.04], [0.09, 0.01]
    z = _blobs(g, [[0.0, 0.0], [1.5, 0.0]], [np.sqrt(var_a), np.sqrt(var_b)], [2000, 1000])
    y = torch.zeros(len(z), dtype=torch.long)
    cem = CEM(CEMConfig(clusters=2, sigma=0.1, surrogate="gmm", gmm_iters=20))
    cem.fit(z, y, 1)
    s = cem.stats
    order = s.centroids[0, :, 0].argsort()
    torch.testing.assert_close(s.var[0, order], torch.tensor([var_a, var_b]), rtol=0.12, atol=0)
    torch.testing.assert_close(s.vbar[0, order], torch.tensor([0.025, 0.05]), rtol=0.08, atol=0)
    torch.testing.assert_close(s.weights[0, order], torch.tensor([2 / 3, 1 / 3]), atol=0.02, rtol=0)
    # EM from a rough start reaches the same answer
    mu, v, w = fit_diag_gmm(z, torch.tensor([[0.2, 0.0], [1.2, 0.0]]), torch.full((2, 2), 0.1),
                            torch.tensor([0.5, 0.5]), 50, 1e-6)
    torch.testing.assert_close(v, torch.tensor([var_a, var_b]), rtol=0.12, atol=0)


def test_on_epoch_end_uses_a_bounded_prefix_and_the_full_class_counts():
    labels = np.array([0, 1] * 50)
    train = Split(np.zeros((100, 1, 2, 2), np.uint8), labels, np.arange(100))
    seen = []

    def features(split):
        seen.append(len(split))
        return torch.rand(len(split), 4), torch.from_numpy(split.labels)

    cem = CEM(CEMConfig(clusters=2, sigma=0.1, max_samples=30))
    ctx = SimpleNamespace(epoch=0, features=features, data=SimpleNamespace(train=train, num_classes=2))
    out = cem.on_epoch_end(ctx)
    assert seen == [30] and out["clusters"] == 4.0
    assert cem.stats.class_count.tolist() == [50.0, 50.0]
    late = CEM(CEMConfig(clusters=2, sigma=0.1, start_epoch=5))
    assert late.on_epoch_end(ctx) == {} and not late.stats.fitted  # not needed before epoch 4 ends


def test_statistics_survive_a_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(2)
    z, y = torch.rand(60, 3, generator=g), torch.arange(60) % 3
    a = CEM(CEMConfig(clusters=2, sigma=0.1, surrogate="gmm"))
    save_checkpoint(tmp_path, 0, {"defense": a.module().state_dict()}, None, {})  # still empty
    a.fit(z, y, 3)
    save_checkpoint(tmp_path, 1, {"defense": a.module().state_dict()}, None, {})
    b = CEM(CEMConfig(clusters=2, sigma=0.1, surrogate="gmm"))
    parts, _, _ = load_checkpoint(tmp_path, "latest", with_optimizer=False)
    b.module().load_state_dict(parts["defense"])
    assert b.hinge(z, y).item() == a.hinge(z, y).item()
    empty, _, _ = load_checkpoint(tmp_path, "epoch-0000", with_optimizer=False)
    b.module().load_state_dict(empty["defense"])
    assert not b.stats.fitted


# ------------------------------------------------------------------------------ lambda schedule

def test_lambda_follows_the_learning_rate_from_epoch_two():
    cem = CEM(CEMConfig(lam=16.0, sigma=0.1))
    assert cem.lambda_at(0, 0.05) == 0.0
    assert cem.lambda_at(1, 0.05) == pytest.approx(16 * 0.001 / 0.05)
    assert cem.lambda_at(5, 4.1e-4) == pytest.approx(16 * 0.001 / 4.1e-4)
    assert cem.lambda_at(5, 4.0e-4) == 16.0
    for epoch in (0, 1):  # refused from the very first step
        with pytest.raises(QdefendError, match="schedule=constant"):
            cem.lambda_at(epoch, None)
    ramp = CEM(CEMConfig(lam=8.0, sigma=0.1, schedule="constant", start_epoch=3, ramp_epochs=2))
    assert [ramp.lambda_at(e, None) for e in range(5)] == [0.0, 0.0, 4.0, 8.0, 8.0]
    assert CEM(CEMConfig(lam=0.0, sigma=0.1)).lambda_at(9, None) == 0.0


def test_finetune_schedule_is_full_lambda_from_the_first_step():
    ft = CEM(CEMConfig(lam=16.0, sigma=0.1, schedule="finetune", start_epoch=4))
    assert [ft.lambda_at(e, 1e-2) for e in range(3)] == [16.0, 16.0, 16.0]  # no lr coupling, no start epoch
    assert ft.first_defended_epoch == 1 and ft.needs_trained_network
    assert CEM(CEMConfig(lam=16.0, sigma=0.1)).needs_trained_network is None
    assert CEM(CEMConfig(lam=0.0, sigma=0.1, schedule="finetune")).needs_trained_network is None


# ------------------------------------------------------------------------------ optimisation order

def _order_step(stack, enc, head, x, y, epoch=1):
    """The trainer's step: grad of the encoder terms w.r.t. the encoder, task backward, then add."""
    for p in [*enc.parameters(), *head.parameters()]:
        p.grad = None
    z = enc(x)
    zr = stack.release(z, torch.Generator().manual_seed(7))
    logits = head(zr)
    ctx = StepContext(x=x, y=y, z=z, z_released=zr, logits=logits, epoch=epoch, step=0, encoder=enc, head=head)
    enc_terms = stack.encoder_loss_terms(ctx)
    enc_params = list(enc.parameters())
    kept = None
    if enc_terms:
        sep = sum(enc_terms.values())
        kept = torch.autograd.grad(sep, enc_params, retain_graph=True, allow_unused=True)
        assert all(g is None for g in torch.autograd.grad(sep, list(head.parameters()), retain_graph=True,
                                                          allow_unused=True))
    F.cross_entropy(logits, y).backward()
    if kept is not None:
        for p, g in zip(enc_params, kept):
            if g is not None:
                p.grad = p.grad + g
    return [p.grad.clone() for p in enc_params], [p.grad.clone() for p in head.parameters()], kept


def test_cem_changes_only_encoder_gradients():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 4), nn.Sigmoid())
    head = nn.Linear(4, 3)
    x, y = torch.randn(48, 6), torch.arange(48) % 3
    noise = GaussianNoise(NoiseConfig(sigma=0.05))
    cem = CEM(CEMConfig(lam=4.0, schedule="constant", clusters=2))
    cem.bind_stack([noise, cem])  # sigma comes from the noise defense
    assert cem.sigma == 0.05
    with torch.no_grad():
        cem.fit(enc(x), y, 3)
    assert cem.describe()["hinge"] > 0  # features spread far above the floor 0.125 * 0.05^2
    e_with, h_with, kept = _order_step(DefenseStack([noise, cem]), enc, head, x, y)
    e_wo, h_wo, _ = _order_step(DefenseStack([noise]), enc, head, x, y)
    for a, b in zip(h_with, h_wo):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(e_with, e_wo))
    for a, b, k in zip(e_with, e_wo, kept):
        torch.testing.assert_close(a, b + k)
    # the release is the noise defense's alone
    assert DefenseStack([noise, cem]).release_spec() == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}


# ------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"lam": -1.0}, "--set defense.params.cem.lam=16"),
        ({"sigma": -0.1}, "--defense noise+cem --sigma 0.1"),
        ({"clusters": 0}, "--set defense.params.cem.clusters=5"),
        ({"clusters": 2.5}, "clusters must be an integer"),
        ({"surrogate": "em"}, "surrogate must be one of kmeans, gmm"),
        ({"schedule": "cosine"}, "schedule must be one of lr, constant"),
        ({"tau": 0.0}, "--set defense.params.cem.tau=0.125"),
        ({"rho_max": 1.5}, "--set defense.params.cem.rho_max=0.99"),
        ({"start_epoch": 1}, "--set defense.params.cem.start_epoch=2"),
        ({"max_samples": -5}, "--set defense.params.cem.max_samples=0"),
        ({"gmm_iters": 0}, "--set defense.params.cem.gmm_iters=10"),
    ],
)
def test_bad_config_fails_at_construction_with_the_fix(kw, needle):
    with pytest.raises(QdefendError) as e:
        CEMConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_noise_floor_comes_from_the_stack():
    cem = CEM(CEMConfig())
    with pytest.raises(QdefendError, match="--defense noise\\+cem --sigma 0.1"):
        cem.bind_stack([cem])  # no noise
    with pytest.raises(QdefendError, match="--defense noise\\+cem --sigma 0.1"):
        cem.bind_stack([GaussianNoise(NoiseConfig(sigma=0.0)), cem])
    with pytest.raises(QdefendError, match="drop defense.params.cem.sigma"):
        mismatch = CEM(CEMConfig(sigma=0.2))
        mismatch.bind_stack([GaussianNoise(NoiseConfig(sigma=0.1)), mismatch])
    off = CEM(CEMConfig(lam=0.0))
    off.bind_stack([off])  # lambda 0: no noise needed
    with pytest.raises(QdefendError, match="--defense noise\\+cem --sigma 0.1"):
        CEM(CEMConfig()).floor  # never bound, no sigma of its own
    with pytest.raises(QdefendError, match="--defense noise\\+cem --sigma 0.1"):  # at the first step
        CEM(CEMConfig(schedule="constant")).encoder_loss_terms(SimpleNamespace(z=None, y=None, epoch=0))
    assert CEM(CEMConfig(sigma=0.1)).floor == pytest.approx(0.125 * 0.01)


# ------------------------------------------------------------------------------ training runs

def _tiny_cfg(lam, scheme="none", epochs=3):
    from qdefend.config import RunConfig

    return RunConfig.from_dict({
        "data": {"limit_train": 256, "limit_test": 200, "val_size": 200, "aux_size": 0},
        "model": {"width": 0.25, "head_width": 0.25},
        "quant": {"scheme": scheme},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "num_threads": 1},
        "defense": {"stack": "noise+cem", "params": {
            "noise": {"sigma": 0.05},
            # sigma comes from the noise (bind_stack); a constant lambda keeps the tiny run's effect visible
            "cem": {"lam": lam, "schedule": "constant", "clusters": 3}}},
    })


def _epochs(run_dir):
    from qdefend.run import RunPaths

    return [r for r in RunPaths(run_dir).read_metrics() if r["event"] == "epoch"]


def test_noise_cem_training_shrinks_cluster_variance(tmp_path):
    from qdefend.run import load_run
    from qdefend.train import Trainer

    Trainer(_tiny_cfg(0.0), tmp_path / "off").fit()
    Trainer(_tiny_cfg(2.0), tmp_path / "on").fit()
    off, on = _epochs(tmp_path / "off"), _epochs(tmp_path / "on")
    assert "train_cem/loss" not in on[0] and on[1]["train_cem/loss"] > 0  # from epoch 2
    assert on[0]["hook_cem/var_mean"] == off[0]["hook_cem/var_mean"]  # same run until CEM starts
    for a, b in zip(on[1:], off[1:]):
        assert a["hook_cem/var_mean"] < 0.95 * b["hook_cem/var_mean"]
    run = load_run(tmp_path / "on", "latest")
    cem = run.defense.defenses[1]
    assert cem.stats.fitted and cem.describe()["var_mean"] == pytest.approx(on[-1]["hook_cem/var_mean"])
    assert run.defense.release_spec() == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}


def test_finetune_starts_from_a_trained_run_with_its_statistics(tmp_path):
    """The CEM code's pretrain route: --from a trained run, statistics fitted before the first step,
    CEM active in epoch 1; without --from it is refused before anything is written."""
    from qdefend.config import RunConfig
    from qdefend.train import Trainer

    Trainer(_tiny_cfg(0.0, epochs=1), tmp_path / "base").fit()
    d = _tiny_cfg(2.0, epochs=1).to_dict()
    d["defense"]["params"]["cem"]["schedule"] = "finetune"
    with pytest.raises(QdefendError, match="--from runs/BASE"):
        Trainer(RunConfig.from_dict(d), tmp_path / "refused").fit()
    assert not (tmp_path / "refused").exists()
    d["init_from"] = str(tmp_path / "base")
    d["train"]["lr"] = 0.001
    Trainer(RunConfig.from_dict(d), tmp_path / "ft").fit()
    from qdefend.run import RunPaths

    recs = RunPaths(tmp_path / "ft").read_metrics()
    assert recs[0]["event"] == "train_start" and recs[0]["hook_cem/clusters"] > 0
    epoch1 = [r for r in recs if r["event"] == "epoch"][0]
    assert epoch1["train_cem/loss"] > 0  # active from the first step


@pytest.mark.slow
def test_noise_cem_qat_run_trains_on_fake_quant_features(tmp_path):
    from qdefend.train import Trainer

    rec = Trainer(_tiny_cfg(2.0, scheme="int8", epochs=2), tmp_path / "q").fit()
    ep = _epochs(tmp_path / "q")
    assert math.isfinite(ep[1]["train_cem/loss"]) and ep[1]["train_cem/loss"] > 0
    assert {"test_acc_fakequant", "test_acc_int8"} <= set(rec)
