"""Tests for qdefend.quant: QAT on real Fashion-MNIST images, int8 conversion, checkpoints, modes, PTQ.

One module-scoped fixture prepares the reference encoder (VGG11-BN cut 2, width 0.25) for QAT,
trains it a few SGD steps with a head on top and converts it once; the tests share it, because
prepare/convert cost seconds each (the first of each also fills the pattern cache).
Output tolerances are in LSB of the Sigmoid output grid, 1/256.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdefend import quant as Q
from qdefend.data import DataConfig, batches, load_dataset
from qdefend.errors import QdefendError
from qdefend.models import ModelConfig, build_model

LSB = 1.0 / 256  # the int8 Sigmoid output grid (TFLite's fixed 1/256, zero point -128)
EPS = 2.0**-12  # the observers' eps in the XNNPACK config; float32 eps (1.2e-7) after a bad load
WEIGHT_SHAPES = [(16, 1, 3, 3), (32, 16, 3, 3), (8, 32, 3, 3)]  # the reference convs at width 0.25


def _encoder(seed=0, **cfg):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{"width": 0.25, "head_width": 0.25, **cfg}), (1, 28, 28), 10)


def _fake_quants(gm):
    return [m for m in gm.modules() if hasattr(m, "observer_enabled") and hasattr(m, "scale")]


@pytest.fixture(scope="module")
def qat():
    """Reference encoder, QAT-prepared, 8 SGD steps on 512 real images, then eval and convert."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread beats two busy ones on the shared machine
    data = load_dataset(DataConfig(limit_train=512, val_size=100, aux_size=100))
    norm = lambda x: data.normalization.apply(torch.from_numpy(x))  # noqa: E731
    model = _encoder()
    gm = Q.prepare_qat(model.encoder, norm(data.train.floats(slice(0, 2))))
    opt = torch.optim.SGD([*gm.parameters(), *model.head.parameters()], lr=0.05, momentum=0.9)
    losses = []
    for x, y in batches(data.train, 64, shuffle=False):
        loss = nn.functional.cross_entropy(model.head(gm(norm(x))), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gm.eval()
    model.head.eval()
    xv = norm(data.val.floats())
    with torch.no_grad():
        fq = gm(xv)
    converted = Q.convert(gm)
    with torch.no_grad():
        i8 = converted(xv)
    yield SimpleNamespace(data=data, model=model, gm=gm, xv=xv, fq=fq, converted=converted, i8=i8,
                          losses=losses)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- QAT round trip


def test_training_reduces_the_loss(qat):
    assert len(qat.losses) == 8 and all(math.isfinite(v) for v in qat.losses)
    assert qat.losses[-1] < 0.8 * qat.losses[0]


def test_converted_graph_holds_int8_weights(qat):
    report = Q.int8_weight_report(qat.converted)
    convs = [n for n in qat.converted.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == 3
    assert report["int8_weight_tensors"] == report["per_channel_weights"] == 3
    assert report["int8_weight_elements"] == sum(math.prod(s) for s in WEIGHT_SHAPES)
    assert report["float_weights"] == 0 and report["output_quantized"] is True
    # input, 2x (conv-relu, maxpool), bottleneck conv, sigmoid output: 7 per-tensor quantize ops
    assert report["quantize_ops"] == 7 and report["dequantize_ops"] == 10


def test_int8_constants_are_symmetric_per_channel(qat):
    conv = qat.converted
    weights = []
    for node in conv.graph.nodes:
        if node.target == torch.ops.quantized_decomposed.dequantize_per_channel.default:
            q, scale, zp, axis, qmin, qmax, dtype = (
                getattr(conv, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args
            )
            assert q.dtype == torch.int8 and dtype == torch.int8 and (qmin, qmax) == (-127, 127)
            assert axis == 0 and scale.shape == zp.shape == (q.shape[0],)
            assert torch.all(zp == 0) and torch.all(scale > 0)  # symmetric
            assert q.min() >= -127 and q.max() <= 127
            assert q.abs().amax(dim=(1, 2, 3)).max() == 127  # the range is used
            weights.append(tuple(q.shape))
    assert sorted(weights) == sorted(WEIGHT_SHAPES)


def _pre_sigmoid_scale(converted) -> float:
    sig = next(n for n in converted.graph.nodes if n.target == torch.ops.aten.sigmoid.default)
    return float(sig.args[0].args[1])  # sigmoid(dequantize_per_tensor(q, scale, zp, ...))


def test_converted_output_matches_fake_quant_eval(qat):
    fq, i8 = qat.fq, qat.i8
    assert i8.shape == fq.shape == (100, 8, 7, 7)
    for z in (fq, i8):  # both lie on the int8 Sigmoid grid: k/256, k = 0..255
        k = z / LSB
        assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 255
    diff = (i8 - fq).abs() / LSB
    # Bound: one step of the int8 grid before the Sigmoid (scale ~0.116) seen through its slope
    # <= 1/4 (~7.4 LSB). With torchao's default fused weight fake-quant this was reached (mean 1.10,
    # max 8 LSB); make_quantizer's FakeQuantize makes it bitwise (test below).
    one_step = math.ceil(_pre_sigmoid_scale(qat.converted) / 4 / LSB)
    assert diff.max() <= one_step + 1
    assert diff.mean() <= 1.5
    with torch.no_grad():
        top_fq = qat.model.head(fq).argmax(1)
        top_i8 = qat.model.head(i8).argmax(1)
    assert (top_fq == top_i8).float().mean() >= 0.97  # measured 1.00 on the 100 val images


def test_fake_quant_eval_is_bitwise_the_int8_model(qat):
    for fq in _fake_quants(qat.gm):
        if fq.qscheme == torch.per_channel_symmetric:  # the weight fake quants
            scale, _ = fq.calculate_qparams()
            assert torch.equal(fq.scale, scale)
    assert torch.equal(qat.fq, qat.i8)


def test_second_convert_is_bitwise_identical_and_leaves_the_prepared_module(qat):
    before = {k: v.clone() for k, v in qat.gm.state_dict().items()}
    again = Q.convert(qat.gm)  # pattern graphs now come from the cache
    with torch.no_grad():
        assert torch.equal(again(qat.xv), qat.i8)
    after = qat.gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not qat.gm.training and not again.training
    with torch.no_grad():
        assert torch.equal(qat.gm(qat.xv), qat.fq)


def test_convert_without_folding_keeps_float_weights_and_the_same_output(qat):
    unfolded = Q.convert(qat.gm, fold_quantize=False)  # the LiteRT path
    report = Q.int8_weight_report(unfolded)
    assert report["int8_weight_tensors"] == 0 and report["float_weights"] == 0
    assert report["per_channel_weights"] == 3 and report["output_quantized"]
    with torch.no_grad():
        assert torch.equal(unfolded(qat.xv), qat.i8)


def test_gradients_reach_the_input(qat):
    """White-box attacks differentiate through the prepared (fake-quant) encoder."""
    x = qat.xv[:4].clone().requires_grad_(True)
    (qat.gm(x) * torch.linspace(-1, 1, 8 * 7 * 7).view(1, 8, 7, 7)).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert (x.grad != 0).float().mean() > 0.9  # measured 1.0: straight-through rounding
    qat.gm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("n", [1, 3, 64])
def test_dynamic_batch(qat, n):
    with torch.no_grad():
        fq, i8 = qat.gm(qat.xv[:n]), qat.converted(qat.xv[:n])
    assert fq.shape == i8.shape == (n, 8, 7, 7)
    # eval mode: each row depends on its own image only
    assert torch.equal(fq, qat.fq[:n]) and torch.equal(i8, qat.i8[:n])


def test_prepare_rejects_an_input_without_batch_dim():
    with pytest.raises(QdefendError, match=r"x\[:2\]"):
        Q.prepare_qat(_encoder().encoder, torch.tensor(1.0))


# ---------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_through_safetensors(qat, tmp_path):
    path = tmp_path / "enc.safetensors"
    save_file(Q.qat_state_dict(qat.gm), str(path))
    state = load_file(str(path))
    # a fresh module (other init, batch-1 example: export specialises it to 2, same keys), training
    fresh = Q.prepare_qat(_encoder(seed=1).encoder, qat.xv[:1])
    assert fresh.training
    Q.load_qat_state_dict(fresh, state)
    # the train/eval mode of the loading module wins over the saved observer flags
    assert all(int(fq.observer_enabled) == 1 for fq in _fake_quants(fresh) if fq.scale.numel())
    fresh.eval()
    own, got = qat.gm.state_dict(), fresh.state_dict()
    assert list(got) == list(own)
    for k in own:
        assert got[k].dtype == own[k].dtype and torch.equal(got[k], own[k]), k
    # regression: safetensors drops state_dict()._metadata and observers reset eps on load
    eps = [v for k, v in got.items() if k.endswith(".eps")]
    assert len(eps) >= 9 and all(float(e) == EPS for e in eps)
    with torch.no_grad():
        assert torch.equal(fresh(qat.xv), qat.fq)


def test_checkpoint_of_another_cut_is_refused(qat):
    other = Q.prepare_qat(_encoder(cut=1).encoder, qat.xv[:2])
    with pytest.raises(QdefendError, match="does not fit this QAT model"):
        Q.load_qat_state_dict(other, Q.qat_state_dict(qat.gm))


def test_checkpoint_of_another_width_is_refused(qat):
    other = Q.prepare_qat(_encoder(width=0.5).encoder, qat.xv[:2])
    with pytest.raises(QdefendError, match="does not fit this QAT model"):
        Q.load_qat_state_dict(other, Q.qat_state_dict(qat.gm))


# ---------------------------------------------------------------------------------- train / eval


def test_train_uses_batch_stats_and_eval_running_stats(qat):
    gm = copy.deepcopy(qat.gm)  # the shared module must keep its BN stats and ranges
    x = qat.xv[:16]
    with torch.no_grad():
        gm.train()
        train_full, train_part = gm(x), gm(x[:4])
        gm.eval()
        eval_a, eval_b = gm(x), gm(x)
    assert not torch.equal(train_full, eval_a)  # batch stats vs running stats
    assert not torch.equal(train_full[:4], train_part)  # a row depends on the rest of its batch
    assert torch.equal(eval_a, eval_b) and torch.equal(gm(x[:4]), eval_a[:4])


def test_outer_train_eval_reaches_the_prepared_module(qat):
    gm = copy.deepcopy(qat.gm)
    outer = nn.Sequential(gm, copy.deepcopy(qat.model.head))
    outer.train()
    assert gm.training and all(int(fq.observer_enabled) == 1 for fq in _fake_quants(gm))
    bn = [n for n in gm.graph.nodes if n.target == torch.ops.aten.batch_norm.default]
    assert len(bn) == 2 and all(n.args[5] is True for n in bn)  # training=True in the graph
    outer.eval()
    assert not gm.training and all(int(fq.observer_enabled) == 0 for fq in _fake_quants(gm))
    bn = [n for n in gm.graph.nodes if n.target == torch.ops.aten.batch_norm.default]
    assert all(n.args[5] is False for n in bn)


def test_freeze_observers_stops_range_updates(qat):
    gm = copy.deepcopy(qat.gm)
    x = 3.0 * qat.xv[:32]  # a wider input range than training saw
    scales = lambda: [fq.scale.clone() for fq in _fake_quants(gm)]  # noqa: E731

    Q.freeze_observers(gm)
    gm.train()  # freezing survives a mode switch
    before = scales()
    running_mean = gm.get_buffer("stage1.1.running_mean").clone()
    with torch.no_grad():
        gm(x)
    assert all(torch.equal(a, b) for a, b in zip(before, scales()))
    assert not torch.equal(running_mean, gm.get_buffer("stage1.1.running_mean"))  # BN still learns

    Q.freeze_observers(gm, False)
    with torch.no_grad():
        gm(x)
    assert not torch.equal(before[0], scales()[0])  # the input range grew


# ---------------------------------------------------------------------------------- PTQ


def test_ptq_calibrate_convert_gives_int8_weights(qat):
    enc = qat.model.encoder  # the float encoder (prepare_qat worked on a copy)
    prepared = Q.prepare_ptq(enc, qat.xv[:2])
    n = Q.calibrate(prepared, [qat.xv[:50], (qat.xv[50:], None)])
    assert n == 100
    converted = Q.convert(prepared)
    report = Q.int8_weight_report(converted)
    assert report["int8_weight_tensors"] == report["per_channel_weights"] == 3
    assert report["float_weights"] == 0 and report["output_quantized"]
    with torch.no_grad():
        ref, got = enc.eval()(qat.xv), converted(qat.xv)
    err = (got - ref).abs() / LSB
    # measured: mean 0.53 LSB, max 5.9 LSB (the float encoder vs its PTQ int8 model)
    assert err.mean() <= 1.0 and err.max() <= 10


def test_calibrate_without_batches_is_an_error(qat):
    prepared = Q.prepare_ptq(qat.model.encoder, qat.xv[:2])
    with pytest.raises(QdefendError, match="no batches"):
        Q.calibrate(prepared, [])


# ---------------------------------------------------------------------------------- config


def test_quant_config_validation():
    assert Q.QuantConfig().enabled and not Q.QuantConfig(scheme="none").enabled
    with pytest.raises(QdefendError, match="must be one of int8, none") as e:
        Q.QuantConfig(scheme="int4")
    assert "quant.scheme must be one of int8, none, got 'int4': e.g. --qat int8" in str(e.value)
    with pytest.raises(QdefendError, match="quantize_head=True needs scheme='int8'"):
        Q.QuantConfig(scheme="none", quantize_head=True)


# ------------------------------------------------------------------- the fast QAT ops (CPU step cost)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_fake_quant_is_bitwise_torch_values_and_gradients(channels_last):
    """fake_quantize_per_tensor == torch.fake_quantize_per_tensor_affine bit for bit: outputs and the
    straight-through gradient, on exact half-step ties, on both sides of the clamp, any zero point."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        x = torch.randn(4, 6, 5, 7, generator=gen) * float(torch.rand(1, generator=gen) * 8 + 0.1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        scale = torch.tensor([float(torch.rand(1, generator=gen) * 0.05 + 1e-3)])
        zp = torch.tensor([int(torch.randint(-128, 128, (1,), generator=gen))], dtype=torch.int32)
        with torch.no_grad():  # ties: exact multiples of half a step, rounded half to even by both
            x[0, 0] = (torch.arange(35).reshape(5, 7) - 17) * 0.5 * scale
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = Q.fake_quantize_per_tensor(a, scale, zp, -128, 127)
        yb = torch.fake_quantize_per_tensor_affine(b, scale, zp, -128, 127)
        g = torch.randn(x.shape, generator=gen)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(ya, yb), trial
        assert torch.equal(a.grad, b.grad), trial
        assert (a.grad == 0).any() and (a.grad != 0).any()  # both sides of the clamp were hit
        assert ya.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_activation_fake_quant_trains_on_the_artifacts_grid(qat):
    """The QAT activations use ActivationFakeQuantize; after training, every per-tensor grid the
    fake-quant rounded with is the observer's calculate_qparams, the grid convert_pt2e writes."""
    act = [m for m in _fake_quants(qat.gm) if not m.is_per_channel]
    cls = Q.activation_fake_quantize()
    assert act and sum(isinstance(m, cls) for m in act) >= 3
    for m in act:
        if isinstance(m, cls):
            scale, zp = m.calculate_qparams()
            assert torch.equal(m.scale, scale) and torch.equal(m.zero_point, zp)


def test_activation_fake_quant_matches_torchaos_plain_fake_quantize():
    """Same buffers, same update, same output as torchao's FakeQuantize with the same observer, on a
    channels_last activation (read in storage order) and a contiguous one."""
    from torchao.quantization.pt2e import FakeQuantize, MovingAverageMinMaxObserver

    kw = dict(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
              qscheme=torch.per_tensor_affine, eps=2**-12)
    ours, ref = Q.activation_fake_quantize()(**kw), FakeQuantize(**kw)
    assert set(ours.state_dict()) == set(ref.state_dict())
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.relu(torch.randn(3, 8, 6, 6, generator=gen)) * (step + 1)
        if step % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours(x), ref(x))
        for k, v in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k


def test_channel_div_gradients_match_autograd():
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    s = (torch.rand(1, 5, 1, 1, dtype=torch.float64) + 0.5)
    torch.autograd.gradcheck(Q.channel_div, (x.requires_grad_(), s.requires_grad_()))
    xf, sf = x.detach().float().requires_grad_(), s.detach().float().requires_grad_()
    xr, sr = xf.detach().clone().requires_grad_(), sf.detach().clone().requires_grad_()
    g = torch.randn(xf.shape)
    out = Q.channel_div(xf, sf)
    assert torch.equal(out, xr / sr)
    out.backward(g)
    (xr / sr).backward(g)
    assert torch.equal(xf.grad, xr.grad)
    assert torch.allclose(sf.grad, sr.grad, rtol=1e-5, atol=1e-6)


def test_prepared_graph_divides_with_channel_div_and_convert_folds_bn(qat):
    """The conv-BN divisions of the prepared graph run channel_div; convert swaps them back on its
    copy (the prepared module keeps channel_div) and folds every BN into its conv."""
    targets = [n.target for n in qat.gm.graph.nodes if n.op == "call_function"]
    assert Q.channel_div in targets
    assert not any("batch_norm" in str(n.target) for n in qat.converted.graph.nodes)
    assert not any(n.target is Q.channel_div for n in qat.converted.graph.nodes)
    assert Q.channel_div in [n.target for n in qat.gm.graph.nodes if n.op == "call_function"]
