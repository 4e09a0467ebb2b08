"""DivQAT (divergence from the float twin inside QAT) and the service-side output defenses.

Hand-computed divergence values, its sign and clip, the float twin of a QAT graph (fake quant off,
buffers restored, autograd of the fake-quant step intact), config errors, the refusal without
QAT, a tiny ``--qat int8 --defense divqat`` Trainer run, and an export + runtime + service smoke
test with every output defense. Output defenses: top-1 kept on random probability vectors, a
hand-computed reverse-sigmoid value, spec parsing and errors.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from qdefend.config import DefenseConfig, RunConfig
from qdefend.defenses import DEFENSES, build_defense, resolved_params
from qdefend.defenses.divqat import DivQAT, DivQATConfig, divergence, divergence_loss, float_twin, has_fake_quant
from qdefend.defenses.output import (
    OUTPUT_DEFENSES, parse_output_defense, reverse_sigmoid, round_probabilities, topk_probabilities,
)
from qdefend.errors import QdefendError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the divergence term

def test_identical_outputs_give_zero():
    q = torch.randn(5, 10)
    assert divergence(q, q.clone(), 2.0).abs().max().item() < 1e-6
    assert divergence_loss(q, q.clone(), weight=1.0, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_kl_at_temperature_two():
    fp, q = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p1 = math.e / (1 + math.e)  # softmax([2, 0] / 2) = softmax([1, 0])
    kl = p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5)  # = 0.11100...
    assert kl == pytest.approx(0.1110, abs=1e-4)
    assert divergence(q, fp, 2.0).item() == pytest.approx(kl, rel=1e-5)
    assert divergence_loss(q, fp, weight=0.3, temperature=2.0).item() == pytest.approx(-0.3 * 4 * kl, rel=1e-5)
    # only_correct: q's argmax (class 0, the first of a tie) against labels 0 (kept) / 1 (dropped)
    assert divergence_loss(q, fp, weight=0.3, temperature=2.0, labels=torch.tensor([1])).item() == 0.0


def test_minimising_the_loss_increases_the_kl_and_fp_gets_no_gradient():
    torch.manual_seed(0)
    fp = torch.randn(8, 10, requires_grad=True)
    q = (fp.detach() + 0.1 * torch.randn(8, 10)).requires_grad_(True)
    before = divergence(q, fp, 4.0).mean().item()
    divergence_loss(q, fp, weight=1.0, temperature=4.0).backward()
    assert fp.grad is None
    with torch.no_grad():
        q2 = q - 0.5 * q.grad
    assert divergence(q2, fp, 4.0).mean().item() > before


def test_clip_bounds_the_term_and_stops_its_gradient():
    fp = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 5.0, 0.0], [0.1, 0.0, 0.0]], requires_grad=True)
    kl = divergence(q, fp, 1.0).detach()
    assert kl[0] > 1.0 > kl[1] > 0
    loss = divergence_loss(q, fp, weight=2.0, temperature=1.0, max_kl=1.0)
    assert loss.item() == pytest.approx(-2.0 * (1.0 + kl[1].item()) / 2, rel=1e-5)
    loss.backward()
    assert torch.count_nonzero(q.grad[0]) == 0 and torch.count_nonzero(q.grad[1]) > 0


# ------------------------------------------------------------------------------ the float twin

def test_float_twin_switches_fake_quant_off_and_restores_every_buffer():
    import copy

    from torchao.quantization.pt2e import FakeQuantize, MovingAverageMinMaxObserver

    torch.manual_seed(0)
    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=3, dtype=torch.quint8)  # 2 bits
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), fq, nn.Linear(8, 4)).train()
    x = torch.randn(32, 6)
    q = net(x)  # the fake-quant step (observer on, BN statistics updated)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad(), float_twin(net):
        assert fq.fake_quant_enabled.item() == 0 and fq.observer_enabled.item() == 0
        fp = net(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # switches, BN stats, ranges
    ref = nn.Sequential(*[copy.deepcopy(m) for i, m in enumerate(net) if i != 2])(x)
    assert torch.allclose(fp, ref, atol=1e-6) and (fp - q).abs().max() > 0.1
    divergence_loss(q, fp, weight=1.0, temperature=2.0).backward()  # q's graph survived the twin
    assert net[0].weight.grad.abs().sum() > 0


def _qat_pair():
    from qdefend import quant

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1),
                        nn.Sigmoid())
    head = nn.Sequential(nn.Flatten(1), nn.Linear(2 * 8 * 8, 5))
    x = torch.randn(16, 1, 8, 8)
    return enc, quant.prepare_qat(enc, x[:2]), head, x


@pytest.mark.slow  # the first torch.export of a process takes ~10 s
def test_float_twin_of_a_pt2e_qat_graph_is_the_float_network():
    enc, gm, head, x = _qat_pair()
    assert has_fake_quant(gm) and not has_fake_quant(enc, head)
    logits = head(gm(x))  # the fake-quant step, observers on: ranges now set
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad(), float_twin(gm, head):
        fp = head(gm(x))
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ref = head(enc.train()(x)).detach()  # the float module (BN on batch statistics, like the twin)
    assert torch.allclose(fp, ref, atol=1e-4)
    assert (fp - logits.detach()).abs().max() > 1e-4  # and it differs from the fake-quant output
    # the fake-quant step's graph is intact: backward after the twin works and reaches the weights
    divergence_loss(logits, fp, weight=1.0, temperature=2.0).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gm.parameters())


@pytest.mark.slow  # torch.export
def test_frozen_reference_is_the_float_network_at_the_snapshot_and_stays_put():
    from qdefend.defenses.base import EpochContext, StepContext

    enc, gm, head, x = _qat_pair()
    head(gm(x))  # observers set
    d = DivQAT(DivQATConfig(reference="frozen", start_epoch=1, weight=1.0))
    d.on_train_start(EpochContext(epoch=-1, encoder=gm, head=head, features=None, data=None))
    gm.eval(), head.eval()
    with torch.no_grad(), float_twin(gm, head):  # the float network, BN on its running statistics
        ref_then = head(gm(x))
    gm.train(), head.train()
    fp = d.reference_logits(x, gm, head)
    assert torch.allclose(fp, ref_then, atol=1e-4)
    opt = torch.optim.SGD([*gm.parameters(), *head.parameters()], lr=0.5)
    for step in range(3):  # train the network: the twin moves with it, the frozen copy does not
        logits = head(gm(x))
        ctx = StepContext(x=x, y=logits.argmax(1).detach(), z=None, z_released=None, logits=logits, epoch=0,
                          step=step, encoder=gm, head=head)
        loss = d.loss_terms(ctx)["divergence"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(d.reference_logits(x, gm, head), fp)
    assert (d.twin_logits(x, gm, head) - fp).abs().max() > 1e-3
    assert not any(p.requires_grad for m in d._frozen for p in m.parameters())


def test_frozen_reference_refuses_a_resume_past_its_snapshot():
    d = DivQAT(DivQATConfig(reference="frozen"))
    with pytest.raises(QdefendError, match="retrain the run"):
        d.reference_logits(torch.zeros(1, 2), nn.Identity(), nn.Identity())


@pytest.mark.slow  # torch.export
def test_learned_scales_train_and_convert_to_the_learned_grid():
    """LSQ activation grids: the observer's grid for the warm-up, then a learned step size with a
    gradient of its own (the float twin has none), and convert writes the learned grid."""
    from qdefend import quant

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    gm = quant.prepare_qat(enc, torch.randn(2, 1, 8, 8), quant.make_quantizer(True, act_scales="learned",
                                                                              act_warmup=3))
    fqs = [m for m in gm.modules() if type(m).__name__ == "LearnedScaleFakeQuantize"]
    assert fqs and all(int(f.learning) == 0 for f in fqs)
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    gm.train()
    for step in range(8):
        out = gm(torch.randn(16, 1, 8, 8))
        loss = (out - 2).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 2:
            observed = [float(f.scale) for f in fqs]
    assert all(int(f.learning) == 1 for f in fqs)
    assert all(f.learned_scale.grad is not None for f in fqs)
    assert any(abs(float(f.scale) - o) > 1e-7 for f, o in zip(fqs, observed))  # the grids moved
    # the twin (fake quant off) does not depend on the learned scales
    x = torch.randn(8, 1, 8, 8)
    opt.zero_grad()
    with float_twin(gm):
        gm(x).sum().backward()
    assert all(f.learned_scale.grad is None for f in fqs)
    gm.eval()
    with torch.no_grad():
        fake, int8 = gm(x), quant.convert(gm)(x)
    assert torch.allclose(fake, int8, atol=1e-5)  # the artifact rounds on the learned grid
    assert [float(f.calculate_qparams()[0]) for f in fqs] == [float(f.scale) for f in fqs]


def test_learned_scale_gradient_is_lsq():
    from qdefend.quant import _LearnedScalePerTensor

    x = torch.tensor([0.26, -0.3, 1.0, 0.05], requires_grad=True)
    s = torch.tensor([0.1], requires_grad=True)
    out = _LearnedScalePerTensor.apply(x, s, 0, -2, 3, 1.0)  # grid [-0.2, 0.3]
    assert torch.allclose(out, torch.tensor([0.3, -0.2, 0.3, 0.0]))  # 0.05/0.1 = 0.5 rounds half to even: 0
    out.sum().backward()
    # d/ds: inside round(x/s) - x/s (0.26: 3 - 2.6 = 0.4; 0.05: 0 - 0.5), outside the clamp code (-2, 3)
    assert s.grad.item() == pytest.approx(0.4 - 2 + 3 - 0.5, abs=1e-5)
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_learned_scales_need_qat():
    from qdefend.quant import QuantConfig

    with pytest.raises(QdefendError, match="--qat int8"):
        QuantConfig(scheme="none", act_scales="learned")
    with pytest.raises(QdefendError, match="act_scales=learned"):
        QuantConfig(act_scales="lsq")


def test_defense_refuses_a_run_without_fake_quantization():
    d = DivQAT()
    ctx = type("Ctx", (), dict(encoder=nn.Linear(2, 2), head=nn.Linear(2, 2), epoch=0))()
    with pytest.raises(QdefendError, match="train with --qat int8"):
        d.loss_terms(ctx)


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("kw, needle", [
    ({"weight": -1}, "weight=0.5"), ({"temperature": 0}, "temperature=4"), ({"max_kl": math.inf}, "max_kl=0.5"),
    ({"max_kl": 0}, "max_kl=0.5"), ({"start_epoch": 0}, "start_epoch=1"), ({"start_epoch": 1.5}, "start_epoch=1"),
    ({"only_correct": "yes"}, "only_correct=true"), ({"eval_samples": -5}, "eval_samples=1000"),
    ({"reference": "float"}, "reference=frozen"),
])
def test_bad_config_fails_at_construction_with_the_fix(kw, needle):
    with pytest.raises(QdefendError, match=f"defense.params.divqat.*--set defense.params.divqat.{needle}") as e:
        DivQATConfig(**kw)
    assert "\n" not in str(e.value)


def test_registered_with_resolved_defaults_and_no_release():
    assert "divqat" in DEFENSES.names()
    stack = build_defense(DefenseConfig("divqat", {"divqat": {"weight": 1.0}}))
    assert resolved_params(stack)["divqat"] == {"weight": 1.0, "temperature": 4.0, "max_kl": 0.5, "start_epoch": 1,
                                                "only_correct": True, "eval_samples": 1000,
                                                "reference": "twin"}
    assert stack.defenses[0].release_spec() is None and stack.release_spec() == {"steps": []}
    z = torch.rand(3, 4)
    assert torch.equal(stack.release(z), z)


# ------------------------------------------------------------------------------ output defenses

def _random_probs(n=500, k=10, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.3), size=n)
    p[:50] = rng.dirichlet(np.full(k, 30.0), size=50)  # near-uniform rows: ties after rounding
    return p


@pytest.mark.parametrize("spec", ["round:0", "round:1", "round:2", "topk:1", "topk:3", "reverse_sigmoid",
                                  "reverse_sigmoid:beta=1,gamma=0.1", "reverse_sigmoid:beta=3,gamma=0.5",
                                  "reverse_sigmoid:0.7,0.2+round:1"])
def test_output_defenses_keep_top1(spec):
    p = _random_probs()
    out = parse_output_defense(spec)(p)
    assert out.shape == p.shape and np.isfinite(out).all() and (out >= 0).all()
    assert np.array_equal(out.argmax(1), p.argmax(1))


def test_output_defenses_do_what_they_say():
    p = _random_probs()
    r = round_probabilities(p, 2)
    top, rounded = p.argmax(1), np.round(p, 2)
    plain = (rounded == rounded.max(1, keepdims=True)).sum(1) == 1  # no tie: rounded as is; ties got one unit
    assert np.array_equal(r[plain], rounded[plain]) and np.array_equal(r.argmax(1), top)
    assert np.allclose(r * 100, np.round(r * 100)) and np.abs(r - p)[plain].max() <= 0.005 + 1e-12
    assert 0 < (~plain).sum() < 50 and np.abs(r - p).max() <= 0.015 + 1e-12
    assert round_probabilities([[0.504, 0.496]], 1).tolist() == [[0.6, 0.5]]  # tie 0.5 / 0.5 broken by one unit
    t = topk_probabilities(p, 3)
    assert ((t > 0).sum(1) <= 3).all() and np.allclose(t.sum(1), 1)
    top3 = np.argsort(-p[7])[:3]
    assert set(np.flatnonzero(t[7])) == set(top3) and np.allclose(t[7, top3], p[7, top3] / p[7, top3].sum())
    assert np.array_equal(topk_probabilities(p, 1), np.eye(10)[p.argmax(1)])
    s = reverse_sigmoid(p, 1.0, 0.1)
    assert np.allclose(s.sum(1), 1) and np.abs(s - p).mean() > 0.05  # a real perturbation


def test_reverse_sigmoid_matches_a_hand_computed_value():
    # beta 1, gamma 0.5: s(0.5 * logit(y)) = 1 / (1 + sqrt((1 - y) / y)): 0.7 -> 1/(1+sqrt(3/7)),
    # 0.2 -> 1/3, 0.1 -> 1/4; y - r = y - (s - 1/2), then normalised
    raw = np.array([0.7 - (1 / (1 + math.sqrt(3 / 7)) - 0.5), 0.2 - (1 / 3 - 0.5), 0.1 - (0.25 - 0.5)])
    want = raw / raw.sum()
    assert want.round(4).tolist() == [0.4539, 0.2794, 0.2667]
    assert np.allclose(reverse_sigmoid([[0.7, 0.2, 0.1]], 1.0, 0.5)[0], want, atol=1e-9)
    # gamma < 1 lifts small classes past the top one (0.45 vs the 0.05 ones); the top-1 is swapped back
    p = np.array([[0.45, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.1]])
    ys = p - 8.0 * (1 / (1 + np.exp(-0.1 * np.log(p / (1 - p)))) - 0.5)
    assert ys.argmax() != 0  # the raw map flips this row
    assert reverse_sigmoid(p, 8.0, 0.1).argmax() == 0


@pytest.mark.parametrize("spec, needle", [
    ("round:-1", "decimals must be an integer in \\[0, 8\\].*e.g. round:2"),
    ("round:1.5", "decimals must be an integer"), ("topk:0", "k must be an integer >= 1.*topk:3"),
    ("reverse_sigmoid:beta=0", "beta must be a finite number > 0"),
    ("reverse_sigmoid:alpha=1", "has no parameter 'alpha'. Valid: beta, gamma"),
    ("round:1,2", "takes 1 argument"), ("rounding:2", "Valid service output defenses: reverse_sigmoid, round, topk"),
])
def test_bad_output_specs_fail_with_the_fix(spec, needle):
    with pytest.raises(QdefendError, match=needle) as e:
        parse_output_defense(spec)
    assert "\n" not in str(e.value)


def test_output_spec_round_trip_and_tag():
    s = parse_output_defense("reverse_sigmoid:1,0.1+round:2")
    assert s.spec() == "reverse_sigmoid:beta=1,gamma=0.1+round:decimals=2"
    assert parse_output_defense(s.spec()).spec() == s.spec() and s.tag() == "reverse_sigmoid-b1-g0.1+round2"
    assert parse_output_defense(None) is None and parse_output_defense("none") is None
    assert OUTPUT_DEFENSES.names() == ["reverse_sigmoid", "round", "topk"]


# ------------------------------------------------------------------------------ training runs

def _tiny_cfg(scheme="int8", **divqat):
    return RunConfig.from_dict({
        "data": {"limit_train": 256, "limit_test": 200, "val_size": 200, "aux_size": 200},
        "model": {"width": 0.25, "head_width": 0.25},
        "quant": {"scheme": scheme},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "num_threads": 1},
        "defense": {"stack": "divqat", "params": {"divqat": {"weight": 1.0, "eval_samples": 100, **divqat}}},
    })


def test_training_without_qat_is_refused_before_any_step(tmp_path):
    from qdefend.run import build_run
    from qdefend.train import Trainer

    msg = "defense 'divqat' needs a fake-quantized network, .* train with --qat int8"
    with pytest.raises(QdefendError, match=msg):
        build_run(_tiny_cfg("none"), data=object())  # refused before the data or the network is touched
    with pytest.raises(QdefendError, match=msg):
        Trainer(_tiny_cfg("none"), tmp_path / "f", progress=False).fit()
    assert not (tmp_path / "f" / "checkpoints").exists()


@pytest.mark.slow
def test_qat_divqat_run_trains_exports_and_serves(tmp_path):
    from qdefend.attacks.targets import open_target
    from qdefend.export import export_run
    from qdefend.run import RunPaths, load_run
    from qdefend.train import Trainer

    root = tmp_path / "dq"
    rec = Trainer(_tiny_cfg(), root, progress=False).fit()
    (ep,) = [r for r in RunPaths(root).read_metrics() if r["event"] == "epoch"]
    assert -1.0 * 16 * 0.5 <= ep["train_divqat/divergence"] < 0  # -weight * T^2 * clipped KL
    assert ep["hook_divqat/kl"] > 0 and 0 <= ep["hook_divqat/top1_agreement"] <= 1
    assert {"test_acc_fakequant", "test_acc_int8"} <= set(rec)
    run = load_run(root)
    assert run.cfg.defense.params["divqat"]["weight"] == 1.0 and run.defense.release_spec() == {"steps": []}

    m = export_run(root, formats="onnx", verify_images=100)
    assert m["release"] == {"steps": []}
    x = run.data.test.floats(slice(0, 64))
    plain = open_target(root, "service:encoder.int8.onnx", run=run)
    p = plain.predict_proba(x)
    assert np.allclose(p.sum(1), 1, atol=1e-5)
    for spec in ("round:2", "topk:2", "reverse_sigmoid:beta=1,gamma=0.1+round:3"):
        t = open_target(root, "service:encoder.int8.onnx", run=run, service_output=spec)
        q = t.predict_proba(x)
        assert np.array_equal(q.argmax(1), p.argmax(1)) and not np.allclose(q, p)
        assert any(spec.split(":")[0] in n for n in t.describe()["notes"])
    with pytest.raises(QdefendError, match="write service:encoder.int8.onnx"):
        open_target(root, "encoder.int8.onnx", run=run, service_output="round:2")
