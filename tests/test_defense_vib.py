"""vib-mask defense: the KL on hand inputs, the top-k mask rule and its schedule, parity of the release
(torch defense, torch_release of attacks, numpy device runtime), manifest validation of the
``vib_sample`` step, config errors, checkpointing, a tiny training run and an int8 export smoke test.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qdefend.config import DefenseConfig, RunConfig
from qdefend.data import Split
from qdefend.defenses import StepContext, build_defense
from qdefend.defenses.vib import (
    VIBMask, VIBMaskConfig, kept_count, kl_per_dim, kl_to_prior, select_mask,
)
from qdefend.edge.manifest import ArtifactError, validate_manifest
from qdefend.edge.release import apply_release, int8_params, torch_release, vib_sample_torch, wire_quant_params
from qdefend.errors import QdefendError

pytestmark = pytest.mark.usefixtures("one_thread")

Z_SHAPE = (4, 3, 3)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def vib(**kw) -> VIBMask:
    return VIBMask(VIBMaskConfig(**kw))


def _ctx(z):
    return StepContext(x=None, y=None, z=z, z_released=None, logits=None, epoch=0, step=0, encoder=None, head=None)


def _trained_looking(d: VIBMask, z_shape=Z_SHAPE, seed=0) -> VIBMask:
    """Build ``d`` for z_shape and give it random logvar and a random 0/1 mask."""
    d.release(torch.zeros(1, *z_shape))
    b = d.bottleneck
    with torch.no_grad():
        b.logvar.copy_(torch.rand(b.logvar.shape, generator=gen(seed)) * 4 - 6)
    mask = (torch.rand(b.mask.shape, generator=gen(seed + 1)) > 0.4).float().flatten()
    mask[0], mask[-1] = 0.0, 1.0  # at least one dropped and one kept dimension
    b.mask = mask.reshape(b.mask.shape)
    return d


# ------------------------------------------------------------------------------ KL


def test_kl_on_hand_inputs():
    assert kl_to_prior(torch.zeros(3, 5), torch.zeros(5)).tolist() == [0.0, 0.0, 0.0]
    # 0.5 (1 + 1 - 1 - 0) + 0.5 (4 + 2 - 1 - ln 2)
    got = kl_to_prior(torch.tensor([[1.0, 2.0]]), torch.tensor([0.0, math.log(2.0)]))
    assert got.item() == pytest.approx(0.5 + 0.5 * (5 - math.log(2.0)), rel=1e-6)
    assert kl_per_dim(torch.tensor(0.0), torch.tensor(-2.0)).item() == pytest.approx(0.5 * (math.exp(-2) + 1))


def test_loss_term_is_beta_times_the_batch_mean_kl_and_trains_logvar_only_in_training():
    d = vib(beta=0.5, init_logvar=0.0)
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])  # per-sample KL 2.5 and 0 with logvar 0
    d.release(z, gen(0))
    assert d.loss_terms(_ctx(z))["kl"].item() == pytest.approx(0.5 * 1.25)
    # an attacker back-propagating through release (no loss_terms) never moves logvar
    fresh = vib(init_logvar=-4.0)
    x = z.clone().requires_grad_(True)
    for _ in range(3):
        fresh.release(x, gen(0)).sum().backward()
    assert torch.equal(fresh.bottleneck.logvar.detach(), torch.full((2,), -4.0))
    # the trainer's order: release, loss_terms, backward; the Adam step lands at the next release
    lv0 = d.bottleneck.logvar.detach().clone()
    zr = d.release(z, gen(1))
    (zr.square().sum() + sum(d.loss_terms(_ctx(z)).values())).backward()
    d.release(z, gen(2))
    assert not torch.equal(d.bottleneck.logvar.detach(), lv0)


# ------------------------------------------------------------------------------ the mask


def test_mask_keeps_round_keep_ratio_dims_with_the_top_scores():
    kl = torch.arange(1.0, 11.0)  # 1..10
    sal = torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    # score ~ kl * sal = [10, 2, 3, 4, 5, 6, 7, 8, 9, 20]
    assert select_mask(kl, sal, 0.3).nonzero().flatten().tolist() == [0, 8, 9]
    assert select_mask(kl, sal, 0.25).nonzero().flatten().tolist() == [0, 9]  # round(2.5) = 2
    assert select_mask(kl, sal, 1.0).sum() == 10
    assert select_mask(torch.ones(6), torch.ones(6), 0.5).tolist() == [1, 1, 1, 0, 0, 0]  # ties: lower index
    m = select_mask(torch.rand(4, 3, 3, generator=gen(0)), torch.rand(4, 3, 3, generator=gen(1)), 0.4)
    assert m.shape == (4, 3, 3) and m.sum() == round(0.4 * 36) == kept_count(0.4, 36) == 14
    assert kept_count(0.01, 10) == 1


def test_mask_update_scores_kl_and_saliency_through_the_head():
    z = torch.rand(64, 4, generator=gen(0)) * torch.tensor([1.0, 1.0, 0.0, 1.0])  # dim 2: mu = 0
    y = (z[:, 0] > z[:, 1]).long()
    head = nn.Linear(4, 2)
    with torch.no_grad():  # the head reads dims 0, 1 and 2; dim 3 carries information it ignores
        head.weight.copy_(torch.tensor([[4.0, -4.0, 4.0, 0.0], [-4.0, 4.0, -4.0, 0.0]]))
        head.bias.zero_()
    head.train()
    d = vib(keep_ratio=0.5, init_logvar=0.0)  # logvar 0: KL_j = 0.5 E[mu_j^2]
    d.release(z)
    kl, sal = d.scores(z, y, head)
    torch.testing.assert_close(kl, 0.5 * z.square().mean(0))
    assert sal[3] == 0 and sal[0] > 0 and sal[2] > 0 and kl[2] == 0
    out = d.update_mask(z, y, head)
    assert d.bottleneck.mask.tolist() == [1.0, 1.0, 0.0, 0.0] and out["mask_changed"] == 2
    assert head.training and head.weight.grad is None  # the head is only read
    assert int(d.bottleneck.mask_updates) == 1


def test_no_mask_before_the_warm_up_then_every_mask_every_epochs():
    d = vib(warmup_epochs=2, mask_every=2, keep_ratio=0.25, saliency_samples=30)
    assert [d.mask_due(e) for e in range(6)] == [False, True, False, True, False, True]
    # a run of 4 epochs: no new mask at the end of the last one; a run of 2: its first mask still
    assert [d.mask_due(e, 4) for e in range(4)] == [False, True, False, False]
    assert [d.mask_due(e, 2) for e in range(2)] == [False, True]
    n = 100
    train = Split(np.zeros((n, 1, 2, 2), np.uint8), np.arange(n) % 3, np.arange(n))
    seen = []

    def features(split):
        seen.append(len(split))
        return torch.rand(len(split), *Z_SHAPE, generator=gen(len(seen))), torch.from_numpy(split.labels)

    head = nn.Sequential(nn.Flatten(1), nn.Linear(36, 3))
    ctx = SimpleNamespace(epoch=0, epochs=0, features=features, head=head, data=SimpleNamespace(train=train))
    d.release(torch.rand(2, *Z_SHAPE))
    out = d.on_epoch_end(ctx)
    assert seen == [] and out["kept"] == 1.0 and bool(d.bottleneck.mask.all())  # warm-up: no mask
    ctx.epoch = 1
    out = d.on_epoch_end(ctx)
    assert seen == [30] and d.bottleneck.mask.sum() == 9 and out["kept"] == 0.25 and out["mask_changed"] == 27
    spec = d.release_spec()
    assert spec["type"] == "vib_sample" and sum(spec["mask"]) == 9 and len(spec["log_sigma"]) == 36


def test_channel_granularity_learns_and_masks_whole_channels():
    d = vib(granularity="channel", keep_ratio=0.5, init_logvar=-2.0)
    z = torch.rand(40, *Z_SHAPE, generator=gen(3))
    d.release(z)
    assert d.bottleneck.logvar.shape == (4,) and d.bottleneck.mask.shape == (4,)
    d.update_mask(z, torch.arange(40) % 2, nn.Sequential(nn.Flatten(1), nn.Linear(36, 2)))
    out = d.release(z, gen(0))
    dropped = (d.bottleneck.mask == 0).nonzero().flatten().tolist()
    assert len(dropped) == 2 and (out[:, dropped] == 0).all() and (out[:, [c for c in range(4) if c not in dropped]] != 0).all()
    spec = d.release_spec()
    assert len(spec["log_sigma"]) == 4 and spec["log_sigma"] == [-1.0] * 4


# ------------------------------------------------------------------------------ release parity


@pytest.mark.parametrize("granularity", ["element", "channel"])
def test_release_in_torch_equals_the_device_runtime_on_the_same_eps(granularity):
    d = _trained_looking(vib(granularity=granularity))
    z = torch.rand(50, *Z_SHAPE, generator=gen(4))
    steps = [d.release_spec()]
    # numpy runtime vs the torch formula on the runtime's own eps draws
    rt = apply_release(z.numpy(), steps, np.random.default_rng(3))
    eps = torch.from_numpy(np.random.default_rng(3).standard_normal(z.shape, dtype=np.float32))
    b = d.bottleneck
    t = vib_sample_torch(z, 0.5 * b.full(b.logvar.detach()), b.full(b.mask), eps=eps)
    assert rt.dtype == np.float32
    np.testing.assert_allclose(rt, t.numpy(), rtol=0, atol=1e-6)
    assert ((rt == 0) == (t.numpy() == 0)).all() and (rt == 0).any()
    # the attacks' torch mirror of the manifest step draws exactly what the defense draws
    assert torch.equal(torch_release(z, steps, gen(5)), d.release(z, gen(5)))
    # and the noise has the learned spread on kept dims
    z = torch.rand(400, *Z_SHAPE, generator=gen(7))
    r = (d.release(z, gen(6)) - z * b.full(b.mask)) / (0.5 * b.full(b.logvar.detach())).exp()
    kept = (b.full(b.mask) > 0).expand_as(z)
    assert r[kept].std().item() == pytest.approx(1.0, abs=0.05)


def test_every_default_is_valid_and_the_stack_exports_one_step():
    s = build_defense(DefenseConfig("vib-mask", {"vib-mask": {"keep_ratio": 0.25}}))
    z = torch.rand(8, *Z_SHAPE, generator=gen(0))
    assert s.release(z, gen(0)).shape == z.shape
    (step,) = s.release_spec()["steps"]
    assert step["type"] == "vib_sample" and step["log_sigma"] == [-3.0] * 36 and step["mask"] == [1.0] * 36
    assert s.names == ["vib-mask"] and "vib-mask" in dict(s.module().named_children())


# ------------------------------------------------------------------------------ manifest


def _manifest(steps, shape=(4, 3, 3)):
    return {
        "run": "toy", "created": "2026-01-01T00:00:00+00:00", "model": {}, "tools": {}, "warnings": [],
        "verification": {}, "artifacts": {},
        "dataset": {"name": "fashion-mnist", "num_classes": 2},
        "input": {"shape": [1, 8, 8], "dtype": "float32", "range": [0, 1], "layout": "NCHW",
                  "normalization": {"mean": [0.5], "std": [0.25]}},
        "features": {"shape": list(shape), "wire": {"dtype": "int8", "scale": 0.007, "zero_point": -71}},
        "release": {"steps": steps},
    }


def test_manifest_validates_the_step_and_refuses_wrong_lengths_and_values():
    d = _trained_looking(vib())
    good = d.release_spec()
    validate_manifest(_manifest([good]))
    validate_manifest(_manifest([_trained_looking(vib(granularity="channel")).release_spec()]))
    short_mask = dict(good, mask=good["mask"][:-1])
    with pytest.raises(ArtifactError, match=r"release.steps\[0\].mask' must be a list of 36 zeros and ones"):
        validate_manifest(_manifest([short_mask]))
    with pytest.raises(ArtifactError, match=r"release.steps\[0\].mask'"):
        validate_manifest(_manifest([dict(good, mask=[0.5] * 36)]))
    with pytest.raises(ArtifactError, match=r"release.steps\[0\].log_sigma'"):
        validate_manifest(_manifest([dict(good, log_sigma=[40.0] * 36)]))
    with pytest.raises(ArtifactError, match=r"release.steps\[1\].log_sigma' has 36 values, features \[2, 3, 3\] need 18"):
        validate_manifest(_manifest([{"type": "dropout", "p": 0.1}, good], shape=(2, 3, 3)))
    with pytest.raises(ArtifactError, match="vib_sample log_sigma has 36 values"):
        apply_release(np.zeros((2, 2, 3, 3), np.float32), [good], np.random.default_rng(0))


def test_wire_covers_four_sigmas_of_the_largest_kept_noise():
    step = {"type": "vib_sample", "log_sigma": [math.log(0.1), math.log(0.5)], "mask": [1, 0]}
    got, want = wire_quant_params(None, [step], [0.0, 1.0]), int8_params(-0.4, 1.4)  # [0, 1] +- 4 * 0.1
    assert got["zero_point"] == want["zero_point"] and got["scale"] == pytest.approx(want["scale"], rel=1e-9)


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"beta": -1.0}, "defense.params.vib-mask.beta=0.001"),
        ({"beta": float("inf")}, "beta must be a finite number"),
        ({"warmup_epochs": 0}, "defense.params.vib-mask.warmup_epochs=1"),
        ({"mask_every": 0}, "defense.params.vib-mask.mask_every=2"),
        ({"mask_every": 1.5}, "mask_every must be an integer"),
        ({"keep_ratio": 0.0}, "defense.params.vib-mask.keep_ratio=0.5"),
        ({"keep_ratio": 1.5}, "keep_ratio must be a finite number in (0, 1]"),
        ({"saliency_samples": -1}, "defense.params.vib-mask.saliency_samples=2048"),
        ({"init_logvar": 50.0}, "defense.params.vib-mask.init_logvar=-6"),
        ({"granularity": "pixel"}, "granularity must be one of element, channel"),
        ({"lr": 0.0}, "defense.params.vib-mask.lr=0.01"),
    ],
)
def test_bad_config_fails_at_construction_with_the_fix(kw, needle):
    with pytest.raises(QdefendError) as e:
        VIBMaskConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_export_before_training_is_refused():
    with pytest.raises(QdefendError, match="train the run"):
        vib().release_spec()


# ------------------------------------------------------------------------------ training runs


def _tiny_cfg(scheme="none", epochs=2, **vib_params):
    return RunConfig.from_dict({
        "data": {"limit_train": 512, "limit_test": 256, "val_size": 256, "aux_size": 256},
        "model": {"width": 0.25, "head_width": 0.25},
        "quant": {"scheme": scheme},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "num_threads": 1},
        "defense": {"stack": "vib-mask", "params": {"vib-mask": {"saliency_samples": 256, **vib_params}}},
    })


def _epochs(run_dir):
    from qdefend.run import RunPaths

    return [r for r in RunPaths(run_dir).read_metrics() if r["event"] == "epoch"]


def test_trainer_learns_logvar_applies_the_mask_after_warm_up_and_checkpoints_it(tmp_path):
    from qdefend.checkpoint import load_checkpoint
    from qdefend.run import load_run
    from qdefend.train import Trainer

    rec = Trainer(_tiny_cfg(keep_ratio=0.25), tmp_path / "r", progress=False).fit()
    e1, e2 = _epochs(tmp_path / "r")
    assert e1["train_vib-mask/kl"] > 0 and math.isfinite(e2["train_vib-mask/kl"])
    assert e1["hook_vib-mask/mask_changed"] == 392 - 98 and e1["hook_vib-mask/kept"] == 0.25  # 8x7x7 features
    assert "hook_vib-mask/mask_changed" not in e2 and e2["hook_vib-mask/kept"] == 0.25  # every 2: none after epoch 2
    assert e2["train_loss"] < math.log(10) and 0 <= rec["test_acc_float"] <= 1
    run = load_run(tmp_path / "r", "latest")
    b = run.defense.defenses[0].bottleneck
    assert b.mask.shape == (8, 7, 7) and b.mask.sum() == 98 and int(b.mask_updates) == 1
    assert not torch.allclose(b.logvar.detach(), torch.full_like(b.logvar, -6.0))  # logvar trained
    _, _, state = load_checkpoint(tmp_path / "r" / "checkpoints", "latest")
    assert "vib-mask" in state["extra_optimizers"]  # its Adam moments survive a resume
    assert sum(run.defense.release_spec()["steps"][0]["mask"]) == 98


@pytest.mark.slow
def test_int8_run_exports_the_step_and_the_device_applies_it(tmp_path):
    from qdefend.edge.manifest import load_manifest
    from qdefend.edge.runtime import Runtime
    from qdefend.export import export_run
    from qdefend.train import Trainer

    root = tmp_path / "q"
    Trainer(_tiny_cfg("int8", keep_ratio=0.5), root, progress=False).fit()
    m = export_run(root, formats=("tflite",), verify_images=128)
    (step,) = m["release"]["steps"]
    assert step["type"] == "vib_sample" and sum(step["mask"]) == 196 and load_manifest(root)["release"] == m["release"]
    assert m["verification"]["status"] == "verified"
    images = (np.random.default_rng(0).random((16, 1, 28, 28)) * 255).astype(np.uint8)
    rt = Runtime.open(root, "encoder.int8.tflite")
    a, b = rt.encode(images, seed=1).dequantize(), rt.encode(images, seed=2).dequantize()
    dropped = np.asarray(step["mask"]).reshape(8, 7, 7) == 0
    assert (a[:, dropped] == 0).all() and (a[:, ~dropped] != b[:, ~dropped]).any()  # masked; sampled per call
    bare = rt.encode(images, release=False).dequantize()
    assert np.abs(a - bare * ~dropped).max() < 1.0  # noise-sized differences on the kept elements
