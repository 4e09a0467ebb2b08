"""The wire's bit-width: grids at 2..8 bits per tensor or per channel, the bit-packed message,
the release order, the QAT wire quantizer, and a tiny run trained, exported, encoded, sent and
attacked at 4 bits per channel."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from qdefend.edge import wire as W
from qdefend.edge.errors import ArtifactError
from qdefend.edge.release import (
    check_wire, code_range, grid_params, int8_params, release_torch_to_wire, to_wire, torch_release, wire_dequantize,
    wire_quantize, wire_torch,
)
from qdefend.errors import QdefendError
from qdefend.quant import QuantConfig, WireQuantizer

SHA = "ab" * 32
ALL_BITS = (2, 3, 4, 5, 6, 7, 8)


def _grid(bits, channels=None, order="release_then_wire", lo=-0.4, hi=1.4):
    if channels is None:
        return {**grid_params(lo, hi, bits), "granularity": "tensor", "order": order}
    gs = [grid_params(lo * (1 + c / 10), hi * (1 + c / 7), bits) for c in range(channels)]
    return {"dtype": "int8", "bits": bits, "granularity": "channel", "order": order,
            "scale": [g["scale"] for g in gs], "zero_point": [g["zero_point"] for g in gs]}


# ------------------------------------------------------------------------------ the message


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(1, 8, 7, 7), (3, 5), (2, 3, 1, 1), (0, 4, 2, 2)])
def test_every_width_round_trips_bit_exactly(bits, per_channel, shape):
    lo, hi = code_range(bits)
    q = np.random.default_rng(bits).integers(lo, hi + 1, size=shape).astype(np.int8)
    q.reshape(-1)[:2] = [lo, hi][:q.size]  # the extreme codes travel too
    scale = [0.01 * (c + 1) for c in range(shape[1])] if per_channel else 0.037
    zp = [lo + c % (hi - lo) for c in range(shape[1])] if per_channel else hi
    body = W.pack(q, scale, zp, SHA, bits=bits)
    msg = W.unpack(body)
    assert msg.q.dtype == np.int8 and np.array_equal(msg.q, q)
    assert (msg.bits, msg.scale, msg.zero_point, msg.encoder_sha256) == (bits, scale, zp, SHA)
    n = q.size
    version = 1 if bits == 8 and not per_channel else 2
    assert body[4] == version
    grid = 12 * shape[1] if per_channel else 12
    head = 52 + 4 * q.ndim if version == 1 else 40 + 4 * q.ndim + grid
    assert len(body) == head + math.ceil(n * bits / 8)
    doc = json.loads(json.dumps(W.to_json(q, scale, zp, SHA, bits=bits)))
    back = W.from_json(doc)
    assert np.array_equal(back.q, q) and back.bits == bits and back.scale == scale


def test_a_4_bit_wire_carries_half_the_bytes_of_int8():
    q = np.zeros((64, 8, 7, 7), np.int8)
    sizes = {b: len(W.pack(q, 0.01, 0, SHA, bits=b)) for b in (8, 6, 4, 2)}
    payload = {b: W.payload_size(8 * 7 * 7, b) for b in (8, 6, 4, 2)}
    assert payload == {8: 392, 6: 294, 4: 196, 2: 98}
    assert sizes == {b: 68 + 64 * payload[b] for b in sizes}  # one 68-byte header per request
    assert sizes[8] / sizes[4] > 1.99


def test_pack_bits_layout_is_lsb_first():
    # codes -8, 7, 0 at 4 bits -> unsigned 0, 15, 8 -> bytes 0xF0 (0 | 15 << 4), 0x08
    assert W.pack_bits(np.array([-8, 7, 0], np.int8), 4) == bytes([0xF0, 0x08])
    # 2 bits: -2, 1, -1, 0, 1 -> 0, 3, 1, 2, 3 -> 0b10_01_11_00 = 0x9C, then 0x03
    assert W.pack_bits(np.array([-2, 1, -1, 0, 1], np.int8), 2) == bytes([0x9C, 0x03])
    for bits in ALL_BITS:
        lo, hi = code_range(bits)
        q = np.arange(lo, hi + 1, dtype=np.int8)
        assert np.array_equal(W.unpack_bits(W.pack_bits(q, bits), len(q), bits), q)


def _v2(q, bits=4, per_channel=False):
    return bytearray(W.pack(q, [0.1] * q.shape[1] if per_channel else 0.1, [0] * q.shape[1] if per_channel else 0,
                            SHA, bits=bits))


@pytest.mark.parametrize("mangle, words", [
    (lambda b: b[:20], "shorter than"),
    (lambda b: b[:-1], "needs 13 bytes"),
    (lambda b: b + b"\0", "needs 13 bytes"),
    (lambda b: b[:5] + bytes([9]) + b[6:], "bits 9"),
    (lambda b: b[:7] + bytes([2]) + b[8:], "grid axis 2"),
    (lambda b: b[:-1] + bytes([b[-1] | 0xF0]), "unused bits"),
])
def test_malformed_packed_messages_name_the_field(mangle, words):
    body = bytes(mangle(_v2(np.zeros((1, 5, 5), np.int8))))  # 25 codes at 4 bits: 13 bytes, 4 bits spare
    with pytest.raises(W.WireError, match=words):
        W.unpack(body)


def test_pack_refuses_codes_outside_the_width_and_bad_grids():
    with pytest.raises(W.WireError, match=r"4-bit codes must lie in \[-8, 7\]"):
        W.pack(np.full((1, 4), 8, np.int8), 0.1, 0, SHA, bits=4)
    with pytest.raises(W.WireError, match="bits must be an integer in 2..8"):
        W.pack(np.zeros((1, 4), np.int8), 0.1, 0, SHA, bits=1)
    with pytest.raises(W.WireError, match=r"zero_point must be an integer in \[-2, 1\]"):
        W.pack(np.zeros((1, 4), np.int8), 0.1, 5, SHA, bits=2)
    with pytest.raises(W.WireError, match="per-channel grid needs lists of 4"):
        W.pack(np.zeros((1, 4), np.int8), [0.1, 0.2], [0, 0], SHA, bits=4)
    with pytest.raises(W.WireError, match=r"\[-8, 7\] \(4-bit codes\)"):
        W.from_json({"shape": [1, 2], "bits": 4, "scale": 0.1, "zero_point": 0, "encoder_sha256": SHA,
                     "features": [0, 9]})


def test_same_grid_compares_bits_granularity_and_values():
    g = _grid(4, channels=3)
    msg = W.Message(np.zeros((1, 3), np.int8), g["scale"], g["zero_point"], SHA, 4)
    assert W.same_grid(msg, g)
    assert not W.same_grid(W.Message(msg.q, g["scale"], g["zero_point"], SHA, 8), g)
    assert not W.same_grid(W.Message(msg.q, [s * 1.01 for s in g["scale"]], g["zero_point"], SHA, 4), g)
    assert not W.same_grid(W.Message(msg.q, 0.1, 0, SHA, 4), g)


# ------------------------------------------------------------------------------ the grid


@pytest.mark.parametrize("bits", ALL_BITS)
def test_grid_params_hold_zero_and_span_the_codes(bits):
    g = grid_params(-0.4, 1.4, bits)
    lo, hi = code_range(bits)
    assert g["bits"] == bits and lo <= g["zero_point"] <= hi
    assert math.isclose(g["scale"], 1.8 / (2 ** bits - 1))
    assert wire_quantize(np.float32([0.0]), {**g})[0] == g["zero_point"]  # 0 is exact on every grid
    assert int8_params(-0.4, 1.4) == grid_params(-0.4, 1.4, 8)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("channels", [None, 4])
def test_numpy_grid_and_its_torch_twin_agree_bit_for_bit(bits, channels):
    z = np.random.default_rng(0).uniform(-1, 2, (50, 4, 3, 3)).astype(np.float32)
    g = _grid(bits, channels)
    q = wire_quantize(z, g)
    lo, hi = code_range(bits)
    assert q.dtype == np.int8 and q.min() == lo and q.max() == hi  # clipped to the width
    want = wire_dequantize(q, g)
    assert np.array_equal(wire_torch(torch.from_numpy(z), g).numpy(), want)
    if channels:  # per channel = each channel on its own per-tensor grid
        for c in range(channels):
            gc = {"bits": bits, "scale": g["scale"][c], "zero_point": g["zero_point"][c]}
            assert np.array_equal(q[:, c], wire_quantize(z[:, c], gc))
    assert len(np.unique(q)) <= 2 ** bits


def test_the_release_order_is_applied_as_recorded():
    z = np.random.default_rng(1).uniform(0, 1, (20, 4, 3, 3)).astype(np.float32)
    steps = [{"type": "topk_prune", "ratio": 0.5}]
    first = _grid(2, order="release_then_wire", lo=0.0, hi=1.0)
    second = {**first, "order": "wire_then_release"}
    rng = np.random.default_rng(0)
    a, b = to_wire(z, steps, first, rng), to_wire(z, steps, second, rng)
    zq = wire_dequantize(wire_quantize(z, first), first)
    from qdefend.edge.release import apply_release

    assert np.array_equal(a, wire_quantize(apply_release(z, steps, rng), first))
    assert np.array_equal(b, wire_quantize(apply_release(zq, steps, rng), first))
    assert not np.array_equal(a, b)  # the order changes which features are pruned
    assert np.array_equal(to_wire(z, steps, first, rng, release=False), wire_quantize(z, first))
    tz = torch.from_numpy(z)
    for g, want in ((first, a), (second, b)):  # the torch twin (attack targets' simulate_release)
        got = release_torch_to_wire(tz, lambda v, gen: torch_release(v, steps, gen), g)
        assert np.array_equal(got.numpy(), wire_dequantize(want, g))


@pytest.mark.parametrize("edit, key", [
    ({"bits": 9}, "features.wire.bits"),
    ({"bits": 4, "zero_point": -9}, "features.wire.zero_point"),
    ({"granularity": "row"}, "features.wire.granularity"),
    ({"order": "sideways"}, "features.wire.order"),
    ({"granularity": "channel"}, "features.wire"),
    ({"dtype": "uint4"}, "features.wire.dtype"),
])
def test_check_wire_names_the_bad_key(edit, key):
    good = {**grid_params(0, 1, 8), "granularity": "tensor", "order": "release_then_wire"}
    check_wire(good)
    check_wire(_grid(4, channels=8), channels=8)
    with pytest.raises(ArtifactError, match=f"manifest key '{key}'"):
        check_wire({**good, **edit})
    with pytest.raises(ArtifactError, match="has 8 channels, the features have 4"):
        check_wire(_grid(4, channels=8), channels=4)


# ------------------------------------------------------------------------------ training


def test_quant_config_checks_the_wire_settings():
    assert not QuantConfig().custom_wire and QuantConfig(wire_bits=4).custom_wire
    assert QuantConfig(wire_order="wire_then_release").custom_wire
    with pytest.raises(QdefendError, match="quant.wire_bits must be one of 2, 3, 4, 5, 6, 7, 8"):
        QuantConfig(wire_bits=1)
    with pytest.raises(QdefendError, match="quant.wire_granularity"):
        QuantConfig(wire_granularity="row")


def test_cli_refuses_a_bad_wire_width_on_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "qdefend.cli", "train", "--wire-bits", "9", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "quant.wire_bits must be one of" in p.stderr and "--wire-bits 4" in p.stderr
    assert not (tmp_path / "r").exists()  # nothing written


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_wire_quantizer_observes_in_training_and_matches_the_manifest_grid(granularity):
    torch.manual_seed(0)
    wq = WireQuantizer(3, granularity, "release_then_wire", channels=4)
    z = torch.rand(16, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    wq.eval()
    assert torch.equal(wq(z), z)  # never observed: passes through
    with pytest.raises(QdefendError, match="never observed"):
        wq.grid()
    wq.train()
    z.requires_grad_(True)
    out = wq(z)
    g = wq.grid()
    assert g["bits"] == 3 and g["granularity"] == granularity
    assert np.array_equal(out.detach().numpy(), wire_dequantize(wire_quantize(z.detach().numpy(), g), g))
    out.sum().backward()
    assert torch.all(z.grad == 1)  # straight through inside the observed range
    before = wq.min_val.clone(), wq.max_val.clone()
    wq(z * 10, observe=False)
    assert torch.equal(wq.min_val, before[0]) and torch.equal(wq.max_val, before[1])
    wq(z.detach() * 2)  # moving average: 1% of the way to the new range
    assert torch.allclose(wq.max_val, before[1] + 0.01 * (2 * before[1] - before[1]))


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def w4_run(tmp_path_factory):
    """A tiny QAT run trained with a 4-bit per-channel wire and release noise, exported."""
    from conftest import tiny_exported_run

    return tiny_exported_run(tmp_path_factory.mktemp("wire") / "w4", images=128, sigma=0.05, num_threads=1,
                             quant={"wire_bits": 4, "wire_granularity": "channel"})


def test_trained_grid_reaches_manifest_checkpoint_and_runtime(w4_run):
    from qdefend.edge.manifest import load_manifest
    from qdefend.edge.runtime import Runtime
    from qdefend.run import load_run

    m = load_manifest(w4_run)
    g = m["features"]["wire"]
    assert (g["bits"], g["granularity"], g["order"]) == (4, "channel", "release_then_wire")
    assert len(g["scale"]) == m["features"]["shape"][0]
    assert load_run(w4_run).wire_grid() == g  # the checkpoint holds the trained range
    for name in ("encoder.int8.tflite", "encoder.int8.onnx"):
        ver = m["verification"]["artifacts"][name]
        assert ver["wire"]["roundtrip_exact"] and ver["wire"]["payload_bytes_per_image"] == 196
        assert "test_acc_release" in ver
    f = Runtime.open(w4_run, "encoder.int8.tflite", threads=1).encode(np.zeros((5, 1, 28, 28), np.uint8), seed=0)
    assert f.bits == 4 and f.q.min() >= -8 and f.q.max() <= 7 and f.scale == g["scale"]
    shown = subprocess.run([sys.executable, "-m", "qdefend.cli", "inspect", str(w4_run / "artifacts" / "encoder.int8.tflite")],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "4-bit codes, per channel (8 scales), release_then_wire" in shown.stdout


def test_attacks_see_the_packed_wire_and_the_torch_twin_agrees(w4_run):
    from qdefend.attacks.targets import RuntimeTarget, TorchTarget
    from qdefend.run import load_run

    run = load_run(w4_run)
    images = run.data.test.floats()[:16]
    rt = RuntimeTarget.open(w4_run, "encoder.int8.tflite", threads=1)
    tt = TorchTarget.from_run(run, "int8")
    assert rt.wire == tt.wire
    a, b = rt.features(images, release=False), tt.features(images, release=False)
    step = np.asarray(rt.wire["scale"], np.float32).reshape(1, -1, 1, 1)
    assert np.all(np.abs(a - b) <= step + 1e-6)  # the runtime's int8 kernels vs torch: at most one code
    codes = np.rint(a / step)  # every value lies on the per-channel 4-bit grid
    assert np.allclose(a, codes * step, atol=1e-6)
    assert len(np.unique(a[:, 0])) <= 16


def test_the_served_head_reads_packed_features(w4_run):
    from qdefend.edge.runtime import Runtime
    from qdefend.serve.service import RequestError, Service

    svc = Service(w4_run, head="float")
    rt = Runtime.open(w4_run, "encoder.int8.tflite", threads=1)
    f = rt.encode(np.random.default_rng(0).integers(0, 255, (4, 1, 28, 28), dtype=np.uint8), seed=0)
    body = W.pack(f.q, f.scale, f.zero_point, rt.entry["sha256"], bits=f.bits)
    assert len(body) == 40 + 16 + 12 * 8 + 4 * 196
    got = svc.infer(W.unpack(body))
    want = svc.head.run(f.dequantize()).argmax(1)
    assert got["labels"] == want.tolist()
    as8 = W.Message(f.q, f.scale, f.zero_point, rt.entry["sha256"], 8)
    with pytest.raises(RequestError, match="differs from the manifest's wire \\(4 bits, per channel"):
        svc.infer(as8)


def test_served_requests_at_4_bits_are_half_the_int8_payload(w4_run, tmp_path):
    """Over HTTP on 127.0.0.1: the 4-bit body a device posts is accepted and answered as the local
    head answers; its size is the 4-bit payload plus one header, so 64 images go in ~half the bytes
    of int8 codes."""
    from test_serve import TOKEN, LiveServer, http

    from qdefend.edge.runtime import Runtime
    from qdefend.serve.app import create_app
    from qdefend.serve.service import ServeConfig

    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    server = LiveServer(create_app(ServeConfig(run=str(w4_run), head="float", token_file=str(token), max_batch=64)))
    try:
        rt = Runtime.open(w4_run, "encoder.int8.tflite", threads=1)
        images = np.random.default_rng(1).integers(0, 255, (64, 1, 28, 28), dtype=np.uint8)
        f = rt.encode(images, seed=0)
        body = W.pack(f.q, f.scale, f.zero_point, rt.entry["sha256"], bits=f.bits)
        status, res = http(server.url, "/v1/infer", body, W.BINARY_TYPE)
        assert status == 200, res
        head = Runtime.open(w4_run, "head.float.onnx", threads=1)
        assert res["labels"] == head.run(f.dequantize()).argmax(1).tolist()
        header = len(W.pack(f.q[:0], f.scale, f.zero_point, rt.entry["sha256"], bits=4))
        assert len(body) == header + 64 * 196 and 64 * 392 / (len(body) - header) == 2.0
        int8_body = 68 + 64 * 392  # the same images on an int8 per-tensor wire
        assert int8_body / len(body) > 1.95
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("stack, params, wire", [
    ("noise+cem", {"noise": {"sigma": 0.1}}, {"wire_bits": 2, "wire_order": "wire_then_release"}),
    ("nopeek", {}, {"wire_bits": 4, "wire_granularity": "channel"}),
    ("vib-mask", {}, {"wire_bits": 3}),
    ("arl", {}, {"wire_bits": 2, "wire_granularity": "channel"}),
    ("shredder", {}, {"wire_bits": 4, "wire_order": "wire_then_release"}),
])
def test_every_kind_of_defense_trains_and_exports_on_a_narrow_wire(tmp_path, stack, params, wire):
    """A loss-term defense, a learned release (VIB, Shredder's tensors), an adversary (ARL) and CEM's
    statistics, each on a narrow wire: trained, exported and verified, the manifest's grid the
    trained one, and the device's codes within the width."""
    from qdefend.config import RunConfig
    from qdefend.edge.manifest import load_manifest
    from qdefend.export import export_run
    from qdefend.train import Trainer

    cfg = RunConfig.from_dict({
        "data": {"limit_train": 256, "limit_test": 64, "val_size": 64, "aux_size": 64},
        "model": {"width": 0.25, "head_width": 0.125}, "quant": {"scheme": "int8", **wire},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "num_threads": 1},
        "defense": {"stack": stack, "params": params}})
    root = tmp_path / "r"
    Trainer(cfg, root, progress=False).fit()
    m = export_run(root, formats=("tflite",), verify_images=32)
    g = load_manifest(root)["features"]["wire"]
    assert g["bits"] == wire["wire_bits"] and g["order"] == wire.get("wire_order", "release_then_wire")
    ver = m["verification"]["artifacts"]["encoder.int8.tflite"]
    assert ver["wire"]["roundtrip_exact"] and 0 <= ver["test_acc_release"] <= 1
    from qdefend.edge.runtime import Runtime

    f = Runtime.open(root, "encoder.int8.tflite", threads=1).encode(np.zeros((4, 1, 28, 28), np.uint8), seed=0)
    lo, hi = code_range(wire["wire_bits"])
    assert f.bits == wire["wire_bits"] and lo <= f.q.min() and f.q.max() <= hi
