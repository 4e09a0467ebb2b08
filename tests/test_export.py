"""Tests for qdefend.export: int8 ONNX / TFLite artifacts of a QAT encoder trained on real
Fashion-MNIST images, their kernels and dtypes, parity with torch, sizes, and export_run.

The module fixture QAT-trains the reference encoder (VGG11-BN cut 2, bottleneck 8 + Sigmoid, full
width so the size ratio is meaningful) for a few steps on 256 real images and exports it once.
Parity is counted in int8 steps (LSB). Behind the Sigmoid one step of the bottleneck conv is up
to ~13 output steps, so the encoder is held to 1 pre-activation step and to >= 99% of output values
within 2 output steps; a head (no Sigmoid) is held to 2 output steps directly.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qdefend import quant
from qdefend.config import RunConfig
from qdefend.data import DataConfig, load_dataset
from qdefend.errors import QdefendError
from qdefend.export import verify as V
from qdefend.export.onnx import check_onnx, export_onnx, ort_op_counts, ort_session
from qdefend.export.tflite import export_tflite
from qdefend.models import ModelConfig, build_model

N_TRAIN, N_TEST = 256, 256


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig(limit_train=N_TRAIN, limit_test=N_TEST, val_size=100, aux_size=100))


@pytest.fixture(scope="module")
def trained(data):
    """A QAT encoder + float head trained 8 steps on real images: (prepared, head, x_test)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=1.0, head_width=0.25), data.shape, data.num_classes)
    norm = data.normalization
    x = torch.from_numpy(norm.apply(data.train.floats()))
    y = torch.from_numpy(data.train.labels)
    enc = quant.prepare_qat(model.encoder, x[:2])
    head = model.head.train()
    opt = torch.optim.SGD([*enc.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    for step in range(8):
        i = slice(32 * step, 32 * step + 32)
        loss = F.cross_entropy(head(enc(x[i])), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    head.eval()
    return enc, head, torch.from_numpy(norm.apply(data.test.floats()))


@pytest.fixture(scope="module")
def onnx_files(trained, tmp_path_factory):
    enc, head, x = trained
    root = tmp_path_factory.mktemp("onnx")
    conv = quant.convert(enc)
    int8 = export_onnx(conv, x[:2], root / "enc.int8.onnx", output_name="features")
    twin = build_model(ModelConfig(width=1.0, head_width=0.25), (1, 28, 28), 10).encoder
    twin.load_state_dict({k: v for k, v in enc.state_dict().items() if k in twin.state_dict()})
    flt = export_onnx(twin.eval(), x[:2], root / "enc.float.onnx", output_name="features")
    return root, conv, int8, flt


def test_onnx_int8_encoder_is_qdq_with_int8_kernels(onnx_files):
    root, conv, info, _ = onnx_files
    assert info["opset"] >= 17
    assert info["op_counts"]["Conv"] == 4 and info["op_counts"]["QuantizeLinear"] >= 4  # 3 + the im2col copy
    assert len(info["rewrites"]) == 1 and "1x1 conv over its im2col" in info["rewrites"][0]
    assert info["input"]["shape"] == [None, 1, 28, 28] and info["output"]["shape"] == [None, 8, 7, 7]
    assert info["output"]["quant"] == {"scale": 1 / 256, "zero_point": -128}  # TFLite sigmoid grid
    assert check_onnx(root / "enc.int8.onnx") == {"ok": True}
    ops = ort_op_counts(root / "enc.int8.onnx")
    assert ops["com.microsoft:QLinearConv"] == 3 and ops["com.microsoft:QLinearSigmoid"] == 1
    # the one float MAC op left is the one-hot copy that builds the first conv's im2col
    assert sum(v for k, v in ops.items() if k.split(":")[-1] in V.FLOAT_MAC_OPS) == 1
    checks = V.static_checks(root / "enc.int8.onnx", "onnx", "int8")
    assert checks["int8_kernels"] is True and checks["pixel_copy_convs"] == 1
    assert V.static_checks(root / "enc.float.onnx", "onnx", "float")["ort_op_counts"]  # float: no verdict


def test_onnx_int8_encoder_matches_torch_within_one_pre_activation_step(onnx_files, trained):
    root, conv, info, _ = onnx_files
    x = trained[2].numpy()
    with torch.no_grad():
        ref = conv(trained[2]).numpy()
    got = ort_session(root / "enc.int8.onnx").run(None, {"input": x})[0]
    grid, pre = V.output_grids(conv)
    assert grid == info["output"]["quant"] and pre is not None
    p = V.lsb_parity(ref, got, grid)
    p.update(V.pre_activation_lsb(ref, got, grid, pre))
    assert p["max_pre_activation_lsb"] <= 1
    assert p["frac_values_within_2lsb"] >= 0.99
    assert p["cosine"] > 0.9999


def test_int8_onnx_is_under_0_3_of_the_float_onnx(onnx_files):
    root = onnx_files[0]
    ratio = (root / "enc.int8.onnx").stat().st_size / (root / "enc.float.onnx").stat().st_size
    assert 0.2 < ratio <= 0.3


@pytest.fixture(scope="module")
def tflite_file(trained, tmp_path_factory):
    """The trained encoder exported once to .tflite (dynamic batch, batch-2 example): (path, report)."""
    enc, _, x = trained
    path = tmp_path_factory.mktemp("tflite") / "enc.tflite"
    return path, export_tflite(enc, x[:2], path)


def test_tflite_encoder_is_fully_int8_and_matches_torch(trained, onnx_files, tflite_file):
    enc, _, x = trained
    path, rep = tflite_file
    assert rep["int8_convs"] is True and len(rep["convs"]) == 4  # the first conv as its im2col + a 1x1 conv
    assert rep["rewrites"] and "im2col" in rep["rewrites"][0]
    assert rep["input"]["dtype"] == "int8" and rep["output"]["dtype"] == "int8"
    assert rep["input"]["shape"] == [None, 1, 28, 28]
    assert rep["output"]["quant"] == {"scale": 1 / 256, "zero_point": -128}
    assert path.stat().st_size <= 0.3 * (onnx_files[0] / "enc.float.onnx").stat().st_size

    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    (i,), (o,) = it.get_input_details(), it.get_output_details()
    it.resize_tensor_input(i["index"], [len(x), 1, 28, 28])
    it.allocate_tensors()
    s, zp = i["quantization"]
    it.set_tensor(i["index"], np.clip(np.rint(x.numpy() / s) + zp, -128, 127).astype(np.int8))
    it.invoke()
    got = (it.get_tensor(o["index"]).astype(np.float32) + 128) / 256
    conv = onnx_files[1]
    with torch.no_grad():
        ref = conv(x).numpy()
    grid, pre = V.output_grids(conv)
    assert V.pre_activation_lsb(ref, got, grid, pre)["max_pre_activation_lsb"] <= 1
    assert V.lsb_parity(ref, got, grid)["frac_values_within_2lsb"] >= 0.99


def test_tflite_batch_is_dynamic_in_every_tensor_not_the_example_batch(trained, tflite_file):
    """litert-torch keeps the example batch (2) in every tensor from the first conv on; a runtime
    that reads the stored shapes (LiteRT.js, no resize call) then sees [2, 8, 7, 7] out of a
    [1, 1, 28, 28] input. Every activation must be stored as the input is: [1, ...] / [-1, ...]."""
    from ai_edge_litert.interpreter import Interpreter

    path, rep = tflite_file
    assert rep["input"]["shape"][0] is None and rep["output"]["shape"] == [None, 8, 7, 7]
    it = Interpreter(model_path=str(path), num_threads=1)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    (i,), (o,) = it.get_input_details(), it.get_output_details()
    acts = {i["index"]} | {k for op in it._get_ops_details() for k in op["outputs"]}
    assert o["index"] in acts and len(acts) == 10  # input, 2 transposes, 4 convs (im2col), 2 pools, sigmoid
    for k in sorted(acts):
        t = tensors[k]
        assert t["shape_signature"][0] == -1 and t["shape"][0] == i["shape"][0] == 1, t
        assert list(t["shape_signature"][1:]) == list(t["shape"][1:]), t  # only the batch is dynamic
    for k in tensors.keys() - acts:  # weights, biases, permutations: no dynamic dim
        assert (tensors[k]["shape_signature"] >= 0).all(), tensors[k]

    s, zp = i["quantization"]
    q = np.clip(np.rint(trained[2][:5].numpy() / s) + zp, -128, 127).astype(np.int8)

    def run(it, x):
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])

    one = Interpreter(model_path=str(path), num_threads=1)  # as stored, never resized
    one.allocate_tensors()
    assert list(one.get_output_details()[0]["shape"]) == [1, 8, 7, 7]
    singles = np.concatenate([run(one, q[j:j + 1]) for j in range(len(q))])
    for b in (1, 5):
        it.resize_tensor_input(i["index"], [b, 1, 28, 28])
        it.allocate_tensors()
        assert list(it.get_output_details()[0]["shape"]) == [b, 8, 7, 7]
        assert np.array_equal(run(it, q[:b]), singles[:b])


def test_int8_head_with_repeated_channel_counts_runs_exact_in_onnxruntime(trained, tmp_path):
    """The head has several 32-channel convs: their shared weight zero points used to make
    onnxruntime's exact-AVX2 mode fail at load ("Attempt to replace the existing tensor")."""
    enc, head, x = trained
    with torch.no_grad():
        z = quant.convert(enc)(x)
    prepared = quant.prepare_ptq(head, z[:2])
    quant.calibrate(prepared, [z[:128], z[128:]])
    conv = quant.convert(prepared)
    info = export_onnx(conv, z[:2], tmp_path / "head.onnx", output_name="logits")
    ops = ort_op_counts(tmp_path / "head.onnx")
    assert ops["com.microsoft:QLinearConv"] == info["op_counts"]["Conv"] >= 3
    assert ops["com.microsoft:QGemm"] == 1
    with torch.no_grad():
        ref = conv(z).numpy()
    got = ort_session(tmp_path / "head.onnx").run(None, {"input": z.numpy()})[0]
    grid, pre = V.output_grids(conv)
    assert pre is None
    assert V.lsb_parity(ref, got, grid)["max_abs_lsb"] <= 2
    # a class may flip only where the two best logits are within the 2-LSB error of each other
    # (without VNNI the exact path still rounds a few logits differently: 3 of 256 on a Zen 3)
    flip = ref.argmax(1) != got.argmax(1)
    top2 = np.sort(V._codes(ref, grid)[flip], 1)[:, -2:]
    assert flip.mean() <= 0.02 and (top2[:, 1] - top2[:, 0] <= 4).all()


def test_pre_activation_lsb_counts_steps_behind_a_sigmoid():
    out, pre = {"scale": 1 / 256, "zero_point": -128}, {"scale": 0.2, "zero_point": 0}
    k = np.array([0, 0, 0, 40])  # pre-activation codes; 40 * 0.2 = 8: sigmoid saturated

    def y(codes):
        return (np.rint(256 / (1 + np.exp(-np.asarray(codes) * 0.2))).clip(0, 255)) / 256

    ref = y(k)
    got = y([0, 1, 3, 45])
    r = V.pre_activation_lsb(ref, got, out, pre)
    assert r["max_pre_activation_lsb"] == 3
    assert V.lsb_parity(ref[None], got[None], out)["max_abs_lsb"] == 37  # 3 steps at the steep middle
    assert V.pre_activation_lsb(ref, ref, out, pre)["max_pre_activation_lsb"] == 0


def test_lsb_parity_reports_steps_and_cosine():
    grid = {"scale": 0.5, "zero_point": 0}
    ref = np.zeros((4, 3), np.float32)
    got = ref.copy()
    got[0, 0], got[1, 1] = 0.5, 1.5
    p = V.lsb_parity(ref + 1, got + 1, grid)
    assert p["max_abs_lsb"] == 3 and p["frac_values_within_2lsb"] == 11 / 12
    assert p["frac_samples_within_2lsb"] == 0.75 and p["max_abs_error"] == 1.5
    assert 0.9 < p["cosine"] < 1


def test_exporters_refuse_the_wrong_graph(trained, tmp_path):
    enc, head, x = trained
    with pytest.raises(QdefendError, match="fold_quantize=True"):
        export_onnx(enc, x[:2], tmp_path / "a.onnx")  # prepared, not converted
    with pytest.raises(QdefendError, match="fold_quantize=False"):
        export_tflite(quant.convert(enc, fold_quantize=True), x[:2], tmp_path / "a.tflite")
    with pytest.raises(QdefendError, match="int8=False"):
        export_tflite(head, torch.rand(2, 8, 7, 7), tmp_path / "b.tflite")


# ------------------------------------------------------------------ export_run on tiny real runs


def _tiny_cfg(qat: str):
    return RunConfig.from_dict({
        "data": {"limit_train": 256, "limit_test": 300, "val_size": 200, "aux_size": 300},
        "model": {"width": 1.0, "head_width": 0.25},  # the reference encoder: real size ratio
        "quant": {"scheme": qat},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
        "defense": {"stack": "noise", "params": {"noise": {"sigma": 0.05}}},
    })


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    from qdefend.train import Trainer

    root = tmp_path_factory.mktemp("runs") / "float"
    Trainer(_tiny_cfg("none"), root, progress=False).fit()
    return root


def test_run_without_qat_is_refused_with_the_choice(float_run):
    from qdefend.export import export_run

    with pytest.raises(QdefendError, match=r"no QAT: retrain with --qat int8, or pass --calibrate N"):
        export_run(float_run)
    with pytest.raises(QdefendError, match="--calibrate 0 is out of range"):
        export_run(float_run, calibrate=0)
    with pytest.raises(QdefendError, match="unknown export format"):
        export_run(float_run, formats=("onnx", "coreml"), calibrate=8)
    assert not (float_run / "manifest.json").exists()


@pytest.mark.slow
def test_calibrate_exports_a_run_without_qat_and_warns(float_run):
    from qdefend.edge.manifest import load_manifest
    from qdefend.export import export_run

    m = export_run(float_run, formats=("tflite",), calibrate=200)
    assert m["model"]["quant"]["encoder_int8"] == "ptq"
    assert any("post-training int8 calibration on 200 aux images" in w for w in m["warnings"])
    assert set(m["artifacts"]) == {"encoder.int8.tflite", "encoder.float.onnx", "head.float.onnx", "head.int8.onnx"}
    assert load_manifest(float_run)["warnings"] == m["warnings"]
    v = m["verification"]["artifacts"]["encoder.int8.tflite"]
    assert v["top1_agreement"] >= 0.97 and m["artifacts"]["encoder.int8.tflite"]["checks"]["int8_kernels"]


@pytest.mark.slow
def test_export_run_writes_verified_artifacts_and_manifest(tmp_path):
    from qdefend.edge.manifest import load_manifest, sha256_file
    from qdefend.edge.runtime import Runtime
    from qdefend.export import export_run
    from qdefend.train import Trainer

    root = tmp_path / "qat"
    Trainer(_tiny_cfg("int8"), root, progress=False).fit()
    lines = []
    m = export_run(root, progress=lines.append)
    assert lines and load_manifest(root) == json.loads((root / "manifest.json").read_text())
    assert set(m["artifacts"]) == {"encoder.int8.onnx", "encoder.int8.tflite", "encoder.float.onnx",
                                   "head.float.onnx", "head.int8.onnx"}
    for name, e in m["artifacts"].items():
        assert sha256_file(root / e["path"]) == e["sha256"]
        if e["precision"] == "int8":
            assert e["checks"]["int8_kernels"] is True, name
    assert m["artifacts"]["encoder.int8.tflite"]["input"]["dtype"] == "int8"
    assert m["release"] == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}
    assert m["features"]["shape"] == [8, 7, 7] and m["features"]["wire"]["dtype"] == "int8"
    assert m["input"]["normalization"]["std"][0] > 0 and m["tools"]["onnxruntime"] == "1.31.1"
    v = m["verification"]
    assert v["test_split"]["images"] == 300 and v["release_off_for_parity"]
    for name in ("encoder.int8.onnx", "encoder.int8.tflite"):
        a = v["artifacts"][name]
        assert a["parity"]["max_pre_activation_lsb"] <= 1, name
        assert a["top1_agreement"] >= 0.99, name
        assert abs(a["test_acc"] - v["torch"]["test_acc_int8"]) <= 0.01
        assert "test_acc_release" in a
        assert v["size_ratio"][name] <= 0.3
    assert v["acceptance"]["passed"] is True
    assert v["artifacts"]["head.int8.onnx"]["parity"]["max_abs_lsb"] <= 2
    assert v["artifacts"]["encoder.float.onnx"]["parity"]["max_abs_error"] < 1e-4
    feats = Runtime.open(root, "encoder.int8.tflite").encode(np.zeros((2, 1, 28, 28), np.uint8), seed=0)
    assert feats.shape == (2, 8, 7, 7)


# ------------------------------------------------------------------ exact export-time rewrites


def _qdq_first_conv(c_in: int, seed: int = 0, kernel=(3, 3), pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1)):
    """input (float) -> Q -> DQ -> Conv (per-channel int8 weights) -> Relu -> Q -> DQ: a QDQ graph
    as the exporter writes an int8 encoder's first layer."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    kh, kw = kernel
    oh, ow = ((12 + pads[i] + pads[i + 2] - dilations[i] * (k - 1) - 1) // strides[i] + 1 for i, k in enumerate(kernel))
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "s_in": np.float32(0.02), "zp_in": np.int8(-7), "w": rng.integers(-127, 128, (16, c_in, kh, kw), dtype=np.int8),
        "s_w": rng.uniform(0.001, 0.01, 16).astype(np.float32), "zp_w": np.zeros(16, np.int8),
        "b": rng.normal(0, 0.1, 16).astype(np.float32), "s_out": np.float32(0.05), "zp_out": np.int8(-128)}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_in", "zp_in"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s_in", "zp_in"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "s_w", "zp_w"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf", "b"], ["c"], pads=list(pads), strides=list(strides),
                              dilations=list(dilations), kernel_shape=[kh, kw]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s_out", "zp_out"], ["rq"]),
             helper.make_node("DequantizeLinear", ["rq", "s_out", "zp_out"], ["out"])]
    g = helper.make_graph(nodes, "first", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c_in, 12, 12])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 16, oh, ow])], inits)
    # the exporter also writes value_info for the weight and the quantised input: the rewrite must drop them
    g.value_info.extend([helper.make_tensor_value_info("w", TensorProto.INT8, [16, c_in, kh, kw]),
                         helper.make_tensor_value_info("xq", TensorProto.INT8, ["N", c_in, 12, 12]),
                         helper.make_tensor_value_info("wf", TensorProto.FLOAT, [16, c_in, kh, kw])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


@pytest.mark.parametrize("c_in, padded", [(1, 4), (3, 4), (4, None), (6, 8)])
def test_padding_the_first_convs_channels_keeps_every_output_bit(c_in, padded):
    from qdefend.export.onnx import pad_first_conv_channels

    model = _qdq_first_conv(c_in)
    before = model.SerializeToString()
    note = pad_first_conv_channels(model)
    assert (note is None) == (padded is None)
    if padded:
        assert f"{c_in} -> {padded}" in note and "Pad" in [n.op_type for n in model.graph.node]
    _same_outputs(before, model, c_in)
    onnx_checker_full(model)


def _same_outputs(before: bytes, model, c_in: int) -> None:
    """onnxruntime gives the same output bits before and after a rewrite (12x12 inputs)."""
    x = (np.random.default_rng(1).random((5, c_in, 12, 12), dtype=np.float32) * 6 - 3)
    x[0, :, :3] = 0.0  # zeros quantise to the input zero point, the value the padding uses
    # the runtime's session: exact int8 kernels (without VNNI the fast ones saturate pair sums,
    # which depend on how the channels pair up)
    outs = [ort_session(blob).run(None, {"input": x})[0] for blob in (before, model.SerializeToString())]
    assert outs[0].shape == outs[1].shape and np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("c_in, conv, channels", [
    (1, {}, "9 -> 12"), (1, {"pads": (0, 0, 0, 0)}, "9 -> 12"), (1, {"strides": (2, 2)}, "9 -> 12"),
    (1, {"dilations": (2, 2), "pads": (2, 2, 2, 2)}, "9 -> 12"), (1, {"kernel": (2, 3), "pads": (0, 1, 1, 1)}, "6 -> 8"),
    (1, {"kernel": (4, 4), "pads": (1, 2, 2, 1)}, "16 -> 16"), (3, {}, None), (1, {"kernel": (1, 1), "pads": (0,) * 4}, None)])
def test_the_first_conv_as_a_1x1_conv_over_its_im2col_keeps_every_output_bit(c_in, conv, channels):
    from qdefend.export.onnx import im2col_first_conv, pixel_copy_convs

    model = _qdq_first_conv(c_in, **conv)
    before = model.SerializeToString()
    note = im2col_first_conv(model)
    assert pixel_copy_convs(model) == (channels is not None)  # the one-hot copy, and not the int8 conv
    if channels is None:  # 27 > 16 products a pixel, or a 1x1 conv already: left alone
        assert note is None and model.SerializeToString() == before
        return
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert f"{channels} channels" in note and len(convs) == 2  # the one-hot float copy, then the 1x1 conv
    assert [a.ints for a in convs[1].attribute] == [[1, 1]]
    _same_outputs(before, model, c_in)
    onnx_checker_full(model)


def _tflite_outputs(path, x: np.ndarray, delegate: bool) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_path=str(path), num_threads=1, experimental_op_resolver_type=kind)
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(i["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(i["index"], x)
    it.invoke()
    return it.get_tensor(o["index"])


@pytest.mark.parametrize("c_in, conv, channels", [
    (1, {"kernel_size": 3, "padding": 1}, 9), (1, {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 2}, 9),
    (1, {"kernel_size": (2, 3)}, 6), (2, {"kernel_size": 2, "padding": 1}, 8), (3, {"kernel_size": 3, "padding": 1}, None)])
def test_tflite_first_conv_as_a_1x1_conv_over_its_int8_im2col_keeps_every_output_bit(tmp_path, c_in, conv, channels):
    """litert writes a 1-channel conv as DEPTHWISE_CONV_2D (and a 2-channel one as CONV_2D); the
    rewrite's int8 one-hot copy and 1x1 conv give the same bits, with XNNPACK and without it."""
    import shutil

    from qdefend.export.tflite import im2col_first_conv, tflite_report

    torch.manual_seed(c_in)
    model = torch.nn.Sequential(torch.nn.Conv2d(c_in, 16, **conv), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(64, c_in, 12, 12)
    prepared = quant.prepare_ptq(model, x[:2])
    quant.calibrate(prepared, [x])
    before, after = tmp_path / "before.tflite", tmp_path / "after.tflite"
    assert export_tflite(prepared, x[:2], before, im2col=False)["rewrites"] == []
    shutil.copy(before, after)
    note = im2col_first_conv(after)
    if channels is None:  # 27 products a pixel: left alone
        assert note is None and after.read_bytes() == before.read_bytes()
        return
    assert f"{channels} channels" in note and im2col_first_conv(after) is None  # not twice
    rep = tflite_report(after)
    assert rep["int8_convs"] and rep["op_counts"].get("DEPTHWISE_CONV_2D", 0) == 0 and len(rep["convs"]) == 3
    q = np.random.default_rng(1).integers(-128, 128, (9, c_in, 12, 12), dtype=np.int8)
    q[0], q[1] = -128, 127  # the extremes: |x - zp| up to 255 through the one-hot rescale
    for delegate in (True, False):
        a, b = _tflite_outputs(before, q, delegate), _tflite_outputs(after, q, delegate)
        assert a.shape == b.shape and np.array_equal(a, b)


def onnx_checker_full(model) -> None:
    """The exporter's own static check: the full checker, strict shape inference included (a
    stale value_info of a padded tensor, as the exporter writes them, fails it)."""
    import onnx

    onnx.checker.check_model(model, full_check=True)


def test_the_rewrite_leaves_a_conv_not_fed_by_the_graph_input_alone():
    from qdefend.export.onnx import pad_first_conv_channels

    model = _qdq_first_conv(1)
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    q.input[0] = "elsewhere"
    assert pad_first_conv_channels(model) is None


def test_a_float_conv_that_computes_is_not_a_pixel_copy():
    from onnx import TensorProto, helper, numpy_helper

    from qdefend.export.onnx import pixel_copy_convs

    def model(w, bias=False):
        inits = [numpy_helper.from_array(w.astype(np.float32), "w")] + (
            [numpy_helper.from_array(np.zeros(len(w), np.float32), "b")] if bias else [])
        node = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], kernel_shape=[3, 3])
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, len(w), 3, 3])], inits)
        return helper.make_model(g)

    onehot = np.zeros((12, 1, 3, 3))
    onehot.reshape(12, 9)[np.arange(9), np.arange(9)] = 1
    assert pixel_copy_convs(model(onehot)) == 1
    assert pixel_copy_convs(model(onehot, bias=True)) == 0
    assert pixel_copy_convs(model(onehot * 0.5)) == 0  # scales: computes
    two = onehot.copy()
    two[0, 0, 1, 1] = 1  # sums two pixels
    assert pixel_copy_convs(model(two)) == 0
