"""cem-slot: the slot dispersion and hinge on hand-computed inputs, the slot module's fit on toy
clusters, encoder-only gradients, the slot module's own optimizer, config errors, and tiny runs
(checkpoint, resume, QAT through export and the device runtime).

cem-slot is registered as "cem-slot"; its training tests run `noise+cem-slot` through the Trainer.
"""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qdefend.config import DefenseConfig
from qdefend.defenses import DEFENSES, DefenseStack, build_defense, resolved_params
from qdefend.defenses.cem_slot import CEMSlot, CEMSlotConfig, slot_dispersion, slot_hinge
from qdefend.defenses.noise import GaussianNoise, NoiseConfig
from qdefend.errors import QdefendError
from test_defense_cem import _order_step  # the trainer's step: encoder-only term, task backward, add

pytestmark = pytest.mark.usefixtures("one_thread")

G_OFF = 0.01  # log offset g
FLOOR = 0.125 * 0.4 ** 2  # tau * sigma^2 at sigma 0.4


def _bound(**kw):
    """A cem-slot bound to a noise of sigma 0.4 (floor 0.02), constant lambda."""
    d = CEMSlot(CEMSlotConfig(schedule="constant", **kw))
    d.bind_stack([GaussianNoise(NoiseConfig(sigma=0.4)), d])
    return d


# ------------------------------------------------------------------------------ dispersion and hinge

def test_dispersion_and_hinge_match_hand_computed_values():
    # class 0: four points, two slots, a hand-built soft assignment; class 1: two coincident points
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [4.0, 4.0], [1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.3, 0.7], [0.3, 0.7]])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    mass, v = slot_dispersion(x, a, group, 2)
    # slot (0,0): mass 2.5, mean (2, 1) / 2.5 = (0.8, 0.4), squared distances 0.8, 1.6, 3.2 (weight 0.5):
    # v = (0.8 + 1.6 + 1.6) / (D=2 * 2.5) = 0.8. Slot (0,1): mass 1.5, mean (8/3, 10/3), squared
    # distances 80/9 (weight 0.5) and 20/9: v = (60/9) / (2 * 1.5) = 20/9. Class 1: both points at the mean.
    torch.testing.assert_close(mass, torch.tensor([[2.5, 1.5], [0.6, 1.4]]))
    torch.testing.assert_close(v, torch.tensor([[0.8, 20 / 9], [0.0, 0.0]]))
    t0 = 0.625 * (math.log(0.8 + G_OFF) - math.log(FLOOR + G_OFF)) + 0.375 * (math.log(20 / 9 + G_OFF) - math.log(FLOOR + G_OFF))
    assert slot_hinge(mass, v, FLOOR, G_OFF, 10.0).item() == pytest.approx(t0 / 2, rel=1e-6)  # mean over 2 classes
    clipped = 0.625 * (math.log(0.8 + G_OFF) - math.log(FLOOR + G_OFF)) + 0.375 * (math.log(1.0 + G_OFF) - math.log(FLOOR + G_OFF))
    h = slot_hinge(mass, v, FLOOR, G_OFF, 1.0)  # var_clip 1: slot (0,1) counts as 1.0 and gets no gradient
    assert h.item() == pytest.approx(clipped / 2, rel=1e-6)
    h.backward()
    assert torch.count_nonzero(x.grad[3]) == 0 and torch.count_nonzero(x.grad[:2]) > 0


def test_hinge_is_exactly_zero_when_features_sit_at_k_points_per_class():
    centres = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x = torch.cat([centres.repeat(4, 1), centres.repeat(4, 1) + 0.5]).requires_grad_(True)  # 2 classes x 3 points
    y = torch.tensor([0] * 12 + [1] * 12)
    hard = torch.eye(3).repeat(8, 1)  # each point to the slot of its point
    mass, v = slot_dispersion(x, hard, y, 2)
    assert torch.count_nonzero(v) == 0 and mass.tolist() == [[4.0] * 3] * 2
    h = slot_hinge(mass, v, FLOOR, G_OFF, 1.0)
    h.backward()
    assert h.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    # the learned module gets there too: after its own fit the assignments are sharp enough
    torch.manual_seed(0)
    d = _bound(slots=3, dim=8, lr=0.01)
    for _ in range(60):
        d.fit_step(x, y, d._draw(2, x.device))
    mass, v = d.statistics(x, y)
    assert v.max().item() < FLOOR / 4
    x.grad = None
    h = d.hinge(x, y)
    h.backward()
    assert h.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_slot_attention_recovers_well_separated_clusters():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 8, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True) * 2  # pairwise distances ~2.8, std 0.1
    x = centres.repeat_interleave(40, 0) + 0.1 * torch.randn(120, 8, generator=g)
    y = torch.zeros(120, dtype=torch.long)
    blob = torch.arange(120) // 40
    true_var = torch.stack([(x[blob == i] - x[blob == i].mean(0)).square().mean() for i in range(3)]).mean()
    torch.manual_seed(0)
    d = _bound(dim=8, lr=0.01)  # the default 5 slots for 3 blobs, as in use: K above the true count
    first = d.fit_step(x, y, d._draw(1, x.device))
    for _ in range(120):
        last = d.fit_step(x, y, d._draw(1, x.device))
    assert first > 10 * true_var and last < 1.1 * true_var
    mass, v = d.statistics(x, y)  # the slots from the mean of the learned Gaussian
    assert float((mass / 120 * v).sum()) == pytest.approx(float(true_var), rel=0.15)
    # no slot straddles two blobs: each slot's mass comes from one blob
    with torch.no_grad():
        a = d.slots.assign(x, torch.zeros(120, dtype=torch.long), 1)
    per_blob = torch.stack([a[blob == i].sum(0) for i in range(3)])  # 3 blobs x 5 slots
    assert float(per_blob.max(0).values.sum() / 120) > 0.97


# ------------------------------------------------------------------------------ optimisation order

def _setup(**kw):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 4), nn.Sigmoid())
    head = nn.Linear(4, 3)
    x, y = torch.randn(48, 6), torch.arange(48) % 3
    noise = GaussianNoise(NoiseConfig(sigma=0.05))
    d = CEMSlot(CEMSlotConfig(lam=4.0, schedule="constant", slots=2, dim=8, **kw))
    d.bind_stack([noise, d])
    return enc, head, x, y, noise, d


@pytest.mark.parametrize("attn_grad", [False, True])
def test_cem_slot_changes_only_encoder_gradients(attn_grad):
    enc, head, x, y, noise, d = _setup(attn_grad=attn_grad)
    assert d.sigma == 0.05
    with torch.no_grad():
        d.fit_step(enc(x), y)
    torch.manual_seed(1)
    e_with, h_with, kept = _order_step(DefenseStack([noise, d]), enc, head, x, y)
    e_wo, h_wo, _ = _order_step(DefenseStack([noise]), enc, head, x, y)
    for a, b in zip(h_with, h_wo):
        assert torch.equal(a, b)  # the head gets nothing from cem-slot
    assert any(float(k.abs().sum()) > 0 for k in kept)
    for a, b, k in zip(e_with, e_wo, kept):
        torch.testing.assert_close(a, b + k)
    assert DefenseStack([noise, d]).release_spec() == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}


def test_slot_parameters_change_only_through_their_own_optimizer():
    enc, head, x, y, noise, d = _setup()
    with torch.no_grad():
        d.fit_step(enc(x), y)
    twin = copy.deepcopy(d)  # its Adam (same moments) holds the twin's parameters
    torch.manual_seed(5)
    _order_step(DefenseStack([noise, d]), enc, head, x, y)  # slot step + encoder term + task backward
    assert all(p.grad is None for p in d.slots.parameters())
    torch.manual_seed(5)
    with torch.no_grad():
        z = enc(x)
    twin.fit_step(z, y, twin._draw(3, z.device))  # the own step alone, same slot draw
    for (n, p), q in zip(d.slots.named_parameters(), twin.slots.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    before = [p.clone() for p in d.slots.parameters()]
    d.hinge(enc(x), y).backward()  # the encoder's term alone moves no slot parameter
    assert all(p.grad is None for p in d.slots.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, d.slots.parameters()))


def test_term_starts_at_start_epoch_and_follows_the_lr_schedule():
    enc, head, x, y, noise, d = _setup()
    z = enc(x)

    def ctx(epoch, lr=None):
        return SimpleNamespace(z=z, y=y, epoch=epoch, lr=lr)

    assert d.encoder_loss_terms(ctx(0)) == {}  # epoch 1: the slot module trains, no term yet
    assert d.slots.built and d._sums["steps"] == 1
    assert d.encoder_loss_terms(ctx(1))["loss"].item() > 0
    coupled = CEMSlot(CEMSlotConfig(lam=4.0, slots=2, dim=8))
    coupled.bind_stack([noise, coupled])
    assert coupled.lambda_at(1, 0.01) == pytest.approx(4.0 * 0.1)
    with pytest.raises(QdefendError, match="--set defense.params.cem-slot.schedule=constant"):
        coupled.encoder_loss_terms(ctx(0))
    out = d.on_epoch_end(None)
    assert set(out) == {"dispersion", "hinge", "gate"} and out["hinge"] > 0 and d._sums["steps"] == 0


# ------------------------------------------------------------------------------ configuration

@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"lam": -1.0}, "--set defense.params.cem-slot.lam=16"),
        ({"sigma": -0.1}, "--defense noise+cem-slot --sigma 0.1"),
        ({"schedule": "cosine"}, "defense.params.cem-slot.schedule must be one of lr, constant"),
        ({"start_epoch": 1}, "--set defense.params.cem-slot.start_epoch=2"),
        ({"tau": 0.0}, "--set defense.params.cem-slot.tau=0.125"),
        ({"slots": 0}, "--set defense.params.cem-slot.slots=5"),
        ({"dim": 2.5}, "dim must be an integer"),
        ({"iters": 0}, "--set defense.params.cem-slot.iters=3"),
        ({"steps": 0}, "--set defense.params.cem-slot.steps=1"),
        ({"temperature": 0.0}, "--set defense.params.cem-slot.temperature=1.0"),
        ({"var_clip": -1.0}, "--set defense.params.cem-slot.var_clip=1.0"),
        ({"lr": math.inf}, "--set defense.params.cem-slot.lr=0.001"),
        ({"gate_init": math.nan}, "--set defense.params.cem-slot.gate_init=0.0"),
        ({"attn_grad": "yes"}, "attn_grad=false"),
    ],
)
def test_bad_config_fails_at_construction_with_the_fix(kw, needle):
    with pytest.raises(QdefendError) as e:
        CEMSlotConfig(**kw)
    msg = str(e.value)
    assert msg.startswith(("cem-slot ", "defense.params.cem-slot.")) and needle in msg and "\n" not in msg


def test_registered_and_needs_noise_in_the_stack():
    assert "cem-slot" in DEFENSES.names()
    with pytest.raises(QdefendError, match="--defense noise\\+cem-slot --sigma 0.1"):
        build_defense(DefenseConfig("cem-slot", {}))
    with pytest.raises(QdefendError, match="drop defense.params.cem-slot.sigma"):
        build_defense(DefenseConfig("noise+cem-slot", {"noise": {"sigma": 0.1}, "cem-slot": {"sigma": 0.2}}))
    s = build_defense(DefenseConfig("noise+cem-slot", {"noise": {"sigma": 0.1}, "cem-slot": {"slots": 3}}))
    assert s.defenses[1].floor == pytest.approx(0.125 * 0.01)
    assert resolved_params(s)["cem-slot"]["slots"] == 3 and s.release_spec()["steps"][0]["type"] == "gaussian_noise"
    build_defense(DefenseConfig("cem-slot", {"cem-slot": {"lam": 0.0}}))  # lambda 0: no noise needed


# ------------------------------------------------------------------------------ training runs

def _tiny_cfg(lam=2.0, scheme="none", epochs=3, aux=0):
    from qdefend.config import RunConfig

    return RunConfig.from_dict({
        "data": {"limit_train": 256, "limit_test": 200, "val_size": 200, "aux_size": aux},  # export calibrates the head on aux
        "model": {"width": 0.25, "head_width": 0.25},
        "quant": {"scheme": scheme},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "num_threads": 1, "schedule": "none"},
        "defense": {"stack": "noise+cem-slot", "params": {
            "noise": {"sigma": 0.05}, "cem-slot": {"lam": lam, "schedule": "constant", "slots": 3, "dim": 16}}},
    })


def _epochs(run_dir):
    from qdefend.run import RunPaths

    return [r for r in RunPaths(run_dir).read_metrics() if r["event"] == "epoch"]


def test_noise_cem_slot_run_reports_checkpoints_and_resumes(tmp_path):
    from qdefend.run import load_run
    from qdefend.train import Trainer

    Trainer(_tiny_cfg(epochs=2), tmp_path / "full", progress=False).fit()
    ep = _epochs(tmp_path / "full")
    assert "train_cem-slot/loss" not in ep[0] and ep[1]["train_cem-slot/loss"] > 0  # from epoch 2
    for r in ep:
        assert r["hook_cem-slot/dispersion"] > 0 and r["hook_cem-slot/hinge"] > 0 and "hook_cem-slot/gate" in r
    assert ep[1]["hook_cem-slot/dispersion"] < ep[0]["hook_cem-slot/dispersion"]
    run = load_run(tmp_path / "full", "latest")
    slot = run.defense.defenses[1]
    assert slot.slots.built and run.defense.release_spec() == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}
    # stop after epoch 1, resume for epoch 2: the same run as the uninterrupted one (slot Adam state included)
    Trainer(_tiny_cfg(epochs=1), tmp_path / "cut", progress=False).fit()
    Trainer(_tiny_cfg(epochs=2), tmp_path / "cut", progress=False).fit(resume=True)
    cut = _epochs(tmp_path / "cut")
    for key in ("hook_cem-slot/dispersion", "hook_cem-slot/hinge", "train_cem-slot/loss", "train_loss"):
        assert cut[1][key] == pytest.approx(ep[1][key], rel=1e-5), key
    resumed = load_run(tmp_path / "cut", "latest").defense.defenses[1]
    for (n, p), q in zip(slot.slots.named_parameters(), resumed.slots.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.slow
def test_noise_cem_slot_qat_run_exports_and_encodes_on_the_device_runtime(tmp_path):
    from qdefend.edge.runtime import Runtime
    from qdefend.export import export_run
    from qdefend.train import Trainer

    root = tmp_path / "q"
    rec = Trainer(_tiny_cfg(scheme="int8", epochs=2, aux=128), root, progress=False).fit()
    ep = _epochs(root)
    assert math.isfinite(ep[1]["train_cem-slot/loss"]) and ep[1]["train_cem-slot/loss"] > 0
    assert {"test_acc_fakequant", "test_acc_int8"} <= set(rec)
    m = export_run(root, formats=("onnx",), verify_images=100)
    assert m["release"] == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}  # nothing of cem-slot
    feats = Runtime.open(root, "encoder.int8.onnx").encode(np.zeros((2, 1, 28, 28), np.uint8), seed=0)
    assert feats.shape == (2, 8, 7, 7)
