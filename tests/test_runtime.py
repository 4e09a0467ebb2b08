"""Tests for qdefend.edge.runtime on real artifacts of a tiny conv encoder (conv 1->4, sigmoid).

The module fixture exports it once to ONNX (dynamic batch), to TFLite with the batch baked in (as
litert-torch does by default: resizing fails, the runtime runs chunks) and to TFLite with a
dynamic batch. Two hand-built ONNX graphs (milliseconds to make) cover int8 input/output
quantisation and ORT's fused int8 QLinearConv. Tolerances: float artifacts match torch to 1e-5,
int8 codes to 1 LSB (2 LSB after an int8 sigmoid; see the slow int8 TFLite test).
"""

import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qdefend.edge import runtime as rt
from qdefend.edge.manifest import ArtifactError, artifact_entry, load_manifest, write_manifest
from qdefend.edge.release import STEP_TYPES, apply_release, dequantize, quantize, wire_quant_params
from qdefend.edge.runtime import Features, Runtime

SHAPE, FEAT = [1, 12, 12], [4, 12, 12]
MEAN, STD = 0.5, 0.25
SIGMA = 0.1
IN_Q = {"scale": 1 / 32, "zero_point": 0}  # int8 grid of the hand-built ONNX input, [-4, 3.97]
OUT_Q = {"scale": 1 / 256, "zero_point": -128}  # TFLite's sigmoid grid
FLOAT_ARTIFACTS = ["encoder.float.onnx", "encoder.float.tflite", "encoder.dyn.tflite"]


def _spec(name, shape, dtype="float32", quant=None):
    return {"name": name, "shape": [None, *shape], "dtype": dtype, "quant": quant}


def _save_onnx(path, nodes, inits, x, z):
    """Save graph x -> z (x, z = (onnx element type, shape without the dynamic batch))."""
    import onnx
    from onnx import helper, numpy_helper

    io = [helper.make_tensor_value_info(name, t, ["batch", *shape]) for name, (t, shape) in (("x", x), ("z", z))]
    graph = helper.make_graph([helper.make_node(op, i, o, **kw) for op, i, o, kw in nodes], "g", io[:1], io[1:],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), path)


def _int8_onnx(path, weight, bias):
    """int8 -> DequantizeLinear -> Conv -> Sigmoid -> QuantizeLinear -> int8, dynamic batch."""
    from onnx import TensorProto

    inits = {"s_in": np.float32(IN_Q["scale"]), "zp_in": np.int8(IN_Q["zero_point"]), "w": weight, "b": bias,
             "s_out": np.float32(OUT_Q["scale"]), "zp_out": np.int8(OUT_Q["zero_point"])}
    nodes = [("DequantizeLinear", ["x", "s_in", "zp_in"], ["xf"], {}),
             ("Conv", ["xf", "w", "b"], ["c"], {"pads": [1, 1, 1, 1]}),
             ("Sigmoid", ["c"], ["sg"], {}),
             ("QuantizeLinear", ["sg", "s_out", "zp_out"], ["z"], {})]
    _save_onnx(path, nodes, inits, (TensorProto.INT8, SHAPE), (TensorProto.INT8, FEAT))


QDQ_IN, QDQ_OUT = [8, 6, 6], [16, 6, 6]
QDQ_IN_Q, QDQ_OUT_Q = {"scale": 1 / 16, "zero_point": 0}, {"scale": 0.5, "zero_point": 0}


def _qdq_conv(path, wq, w_scale):
    """float -> Q -> DQ -> Conv(DQ(int8 per-channel weights)) -> Q -> DQ -> float, as torch.onnx
    writes int8 models; ORT fuses it into QuantizeLinear -> QLinearConv -> DequantizeLinear."""
    from onnx import TensorProto

    inits = {"s_in": np.float32(QDQ_IN_Q["scale"]), "zp": np.int8(0), "s_out": np.float32(QDQ_OUT_Q["scale"]),
             "wq": wq, "s_w": w_scale, "zp_w": np.zeros(len(wq), np.int8), "b": np.zeros(len(wq), np.float32)}
    nodes = [("QuantizeLinear", ["x", "s_in", "zp"], ["xq"], {}),
             ("DequantizeLinear", ["xq", "s_in", "zp"], ["xf"], {}),
             ("DequantizeLinear", ["wq", "s_w", "zp_w"], ["w"], {"axis": 0}),
             ("Conv", ["xf", "w", "b"], ["c"], {"pads": [1, 1, 1, 1]}),
             ("QuantizeLinear", ["c", "s_out", "zp"], ["cq"], {}),
             ("DequantizeLinear", ["cq", "s_out", "zp"], ["z"], {})]
    _save_onnx(path, nodes, inits, (TensorProto.FLOAT, QDQ_IN), (TensorProto.FLOAT, QDQ_OUT))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(artifacts dir, reference fn: normalised float32 -> float32) for the tiny encoder."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Sigmoid()).eval()
    x = torch.rand(2, *SHAPE)
    out = tmp_path_factory.mktemp("built") / "artifacts"
    out.mkdir()
    batch = ({0: torch.export.Dim("batch")},)
    torch.onnx.export(net, (x,), str(out / "encoder.float.onnx"), dynamo=True, dynamic_shapes=batch, verbose=False)
    litert_torch.convert(net, (x,)).export(str(out / "encoder.float.tflite"))
    litert_torch.convert(net, (x,), dynamic_shapes=batch).export(str(out / "encoder.dyn.tflite"))
    _int8_onnx(str(out / "encoder.int8.onnx"), net[0].weight.detach().numpy(), net[0].bias.detach().numpy())
    wq = np.random.default_rng(0).choice(np.int8([-127, 127]), (QDQ_OUT[0], QDQ_IN[0], 3, 3))  # full range
    _qdq_conv(str(out / "head.qdq.onnx"), wq, np.full(len(wq), 0.01, np.float32))
    torch.set_num_threads(threads)

    def reference(xn):
        with torch.no_grad():
            return net(torch.from_numpy(np.asarray(xn, np.float32))).numpy()

    return out, reference


def make_run(built, tmp_path, steps=({"type": "gaussian_noise", "sigma": SIGMA},), **overrides):
    """A run dir holding copies of the artifacts and a manifest written with the manifest API."""
    run_dir = tmp_path / "run"
    shutil.copytree(built[0], run_dir / "artifacts")
    arts = {}
    for name in FLOAT_ARTIFACTS + ["encoder.int8.onnx"]:
        int8 = name == "encoder.int8.onnx"
        arts[name] = artifact_entry(
            run_dir, f"artifacts/{name}", format=name.rsplit(".", 1)[1], role="encoder",
            precision="int8" if int8 else "float",
            input=_spec("x", SHAPE, *(("int8", IN_Q) if int8 else ())),
            output=_spec("z", FEAT, *(("int8", OUT_Q) if int8 else ())))
        arts[name].update(overrides.get(name, {}))
    arts["head.qdq.onnx"] = artifact_entry(
        run_dir, "artifacts/head.qdq.onnx", format="onnx", role="head", precision="int8",
        input=_spec("x", QDQ_IN, quant=QDQ_IN_Q), output=_spec("z", QDQ_OUT, quant=QDQ_OUT_Q))
    write_manifest(run_dir, {
        "dataset": {"name": "toy", "num_classes": 2},
        "input": {"shape": SHAPE, "dtype": "float32", "range": [0, 1], "layout": "NCHW",
                  "normalization": {"mean": [MEAN], "std": [STD]}},
        "features": {"shape": FEAT, "wire": wire_quant_params(None, list(steps), [0.0, 1.0])},
        "release": {"steps": list(steps)}, "artifacts": arts,
    })
    return run_dir


@pytest.fixture
def run_dir(built, tmp_path):
    return make_run(built, tmp_path)


def images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def normalise(u8):
    return (np.divide(u8, 255, dtype=np.float32) - np.float32(MEAN)) / np.float32(STD)


# --------------------------------------------------------------------------------------------
# Parity and batching


@pytest.mark.parametrize("artifact", FLOAT_ARTIFACTS)
def test_float_artifacts_match_torch_for_any_batch(built, run_dir, artifact):
    r = Runtime.open(run_dir, artifact)
    assert r.interpreter_name == ("onnxruntime" if artifact.endswith(".onnx") else "litert")
    for n in (1, 7, 64, 7):
        x = normalise(images(n, seed=n))
        y = r.run(x)
        assert y.shape == (n, *FEAT) and y.dtype == np.float32
        np.testing.assert_allclose(y, built[1](x), atol=1e-5, rtol=0)
    want = {"encoder.float.onnx": "dynamic", "encoder.float.tflite": "fixed 2 (run in chunks)",
            "encoder.dyn.tflite": "dynamic"}[artifact]
    assert r.info()["batch"] == want


def test_int8_onnx_quantises_the_input_and_dequantises_the_output(built, run_dir):
    r = Runtime.open(run_dir, "encoder.int8.onnx")
    x = normalise(images(7))
    xq = dequantize(quantize(x, IN_Q["scale"], IN_Q["zero_point"]), IN_Q["scale"], IN_Q["zero_point"])
    want = quantize(built[1](xq), OUT_Q["scale"], OUT_Q["zero_point"])
    got = quantize(r.run(x), OUT_Q["scale"], OUT_Q["zero_point"])
    assert np.abs(got.astype(int) - want).max() <= 1
    info = r.info()
    assert info["input"]["dtype"] == "int8" and info["precision"] == "int8"


def test_int8_onnx_conv_is_exact_on_x86_without_vnni(built, run_dir):
    """Full-range int8 weights times large activations overflow the 16-bit pair sums of ORT's
    default u8s8 QLinearConv on x86 without VNNI: on this AVX2 host codes were off by up to 159
    LSB until the runtime set session.x64quantprecision=1."""
    import onnx
    from numpy.lib.stride_tricks import sliding_window_view

    r = Runtime.open(run_dir, "head.qdq.onnx", threads=1)
    x = np.random.default_rng(1).uniform(-8, 7.9, (32, *QDQ_IN)).astype(np.float32)
    got = quantize(r.run(x), QDQ_OUT_Q["scale"], 0)
    wq = onnx.numpy_helper.to_array(next(t for t in onnx.load(built[0] / "head.qdq.onnx").graph.initializer
                                         if t.name == "wq")).astype(np.int64)
    xq = np.pad(quantize(x, QDQ_IN_Q["scale"], 0).astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.einsum("nchwij,ocij->nohw", sliding_window_view(xq, (3, 3), axis=(2, 3)), wq)  # exact int
    want = quantize(acc * np.float32(QDQ_IN_Q["scale"] * 0.01), QDQ_OUT_Q["scale"], 0)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_encode_without_release_is_the_encoder_on_the_wire_grid(built, run_dir):
    r = Runtime.open(run_dir, "encoder.float.onnx")
    u8 = images(64)
    f = r.encode(u8, release=False)
    wire = load_manifest(run_dir)["features"]["wire"]
    assert isinstance(f, Features) and f.q.dtype == np.int8 and len(f) == 64 and f.shape == (64, *FEAT)
    assert (f.scale, f.zero_point) == (wire["scale"], wire["zero_point"])
    z = built[1](normalise(u8))
    assert np.abs(f.q.astype(int) - quantize(z, f.scale, f.zero_point)).max() <= 1
    assert np.abs(f.dequantize() - z).max() <= f.scale / 2 + 1e-6  # wire round trip
    same = r.encode(np.divide(u8, 255, dtype=np.float32), release=False, batch_size=5)
    np.testing.assert_array_equal(same.q, f.q)  # float pixels == uint8 pixels, any batch size
    assert len(r.encode(np.zeros((0, *SHAPE), np.uint8))) == 0


def test_gaussian_release_has_the_manifest_sigma_and_is_seeded(run_dir):
    r = Runtime.open(run_dir, "encoder.float.onnx")
    u8 = images(64)
    clean = r.encode(u8, release=False).dequantize()
    noisy = r.encode(u8, seed=3)
    diff = noisy.dequantize() - clean
    assert abs(diff.std() - SIGMA) < 0.003 and abs(diff.mean()) < 0.003
    np.testing.assert_array_equal(noisy.q, r.encode(u8, seed=3, batch_size=10).q)
    np.testing.assert_array_equal(noisy.q, r.encode(u8, rng=np.random.default_rng(3)).q)
    assert (noisy.q != r.encode(u8, seed=4).q).mean() > 0.5
    assert noisy.q.min() > -128 and noisy.q.max() < 127  # 4 sigma of head room: nothing clips
    with pytest.raises(ArtifactError, match="either seed or rng"):
        r.encode(u8, seed=1, rng=np.random.default_rng(1))


# --------------------------------------------------------------------------------------------
# Release steps and quantisation (numpy only)


def test_every_release_step_type_has_a_check_a_numpy_function_and_a_torch_twin():
    assert all(callable(s.check) and callable(s.numpy) and callable(s.torch) for s in STEP_TYPES.values())
    with pytest.raises(ArtifactError, match="unknown release step type 'blur'; known: gaussian_noise"):
        apply_release(np.zeros((2, 3)), [{"type": "blur"}], np.random.default_rng(0))


def test_dropout_laplace_and_topk_prune():
    rng = np.random.default_rng(0)
    z = rng.uniform(0.5, 1.0, (200, 4, 8, 8)).astype(np.float32)
    d = apply_release(z, [{"type": "dropout", "p": 0.3}], rng)
    assert abs((d == 0).mean() - 0.3) < 0.01
    np.testing.assert_array_equal(d[d != 0], z[d != 0])  # no 1/(1-p) rescaling
    lap = apply_release(z, [{"type": "laplace_noise", "scale": 0.2}], rng) - z
    assert abs(lap.std() - 0.2 * np.sqrt(2)) < 0.005
    p = apply_release(z, [{"type": "topk_prune", "ratio": 0.25}], rng).reshape(200, -1)
    flat = z.reshape(200, -1)
    assert ((p == 0).sum(axis=1) == 64).all()  # exactly 25% of 256 per sample
    kept_min = np.where(p != 0, np.abs(flat), np.inf).min(axis=1)
    pruned_max = np.where(p == 0, np.abs(flat), -np.inf).max(axis=1)
    assert (pruned_max <= kept_min).all()
    assert apply_release(z, [{"type": "dropout", "p": 0.0}], rng) is not None
    np.testing.assert_array_equal(apply_release(z, [{"type": "gaussian_noise", "sigma": 0.0}], rng), z)


def test_quantize_round_trip_within_half_a_step_and_clips():
    w = wire_quant_params(None, [{"type": "gaussian_noise", "sigma": SIGMA}], [0.0, 1.0])
    z = np.linspace(-0.4, 1.39, 10001, dtype=np.float32)
    err = np.abs(dequantize(quantize(z, w["scale"], w["zero_point"]), w["scale"], w["zero_point"]) - z)
    assert err.max() <= w["scale"] / 2 + 1e-6
    assert quantize(np.float32([-10, 10]), w["scale"], w["zero_point"]).tolist() == [-128, 127]


# --------------------------------------------------------------------------------------------
# Errors: tampering, inputs, manifest mismatch


def test_tampered_artifacts_are_refused_before_loading(run_dir, monkeypatch):
    monkeypatch.setattr(rt, "_import_interpreter", lambda name: pytest.fail("loaded a bad artifact"))
    path = run_dir / "artifacts" / "encoder.float.tflite"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"corrupted or was modified \(sha256 mismatch\): re-export with "
                                            r"`qdefend export .*run`"):
        Runtime.open(run_dir, "encoder.float.tflite")
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match="truncated"):
        Runtime.open(run_dir, "encoder.float.tflite")
    path.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Runtime.open(run_dir / "manifest.json", "encoder.float.tflite")


@pytest.mark.parametrize("bad, needle", [
    (np.zeros((2, 3, 32, 32), np.float64), r"input must be \(N, 1, 12, 12\) uint8 or float32 in \[0,1\], "
                                           r"got \(2, 3, 32, 32\) float64"),
    (np.zeros((2, 12, 12), np.uint8), r"got \(2, 12, 12\) uint8"),
    (np.zeros((2, 1, 12, 12), np.int32), r"got \(2, 1, 12, 12\) int32"),
    (np.full((2, 1, 12, 12), 255.0, np.float32), r"pixels in \[0,1\], got \[255, 255\]"),
    (np.full((2, 1, 12, 12), np.nan, np.float32), r"pixels in \[0,1\], got NaN or Inf"),
])
def test_wrong_inputs_say_what_is_expected(run_dir, bad, needle):
    r = Runtime.open(run_dir, "encoder.float.onnx")
    with pytest.raises(ArtifactError, match=needle):
        r.encode(bad)


def test_run_checks_its_input_shape(run_dir):
    r = Runtime.open(run_dir, "encoder.dyn.tflite")
    with pytest.raises(ArtifactError, match=r"encoder.dyn.tflite input must be \(N, 1, 12, 12\) float32, got "
                                            r"\(3, 1, 10, 10\) float32"):
        r.run(np.zeros((3, 1, 10, 10), np.float32))


def test_artifact_that_disagrees_with_its_manifest_is_refused(built, tmp_path):
    lie = {"encoder.int8.onnx": {"input": _spec("x", SHAPE)}}  # says float32; the graph takes int8
    run_dir = make_run(built, tmp_path, **lie)
    with pytest.raises(ArtifactError, match=r"encoder.int8.onnx input is \(N, 1, 12, 12\) int8 but the "
                                            r"manifest says \(N, 1, 12, 12\) float32: re-export"):
        Runtime.open(run_dir, "encoder.int8.onnx")


def test_encode_refuses_a_head_artifact(built, tmp_path):
    run_dir = make_run(built, tmp_path, **{"encoder.float.onnx": {"role": "head"}})
    r = Runtime.open(run_dir, "encoder.float.onnx")
    assert r.run(normalise(images(3))).shape == (3, *FEAT)  # run() takes any artifact
    with pytest.raises(ArtifactError, match=r"encoder.float.onnx is a head, not an encoder: use \.run"):
        r.encode(images(3))


# --------------------------------------------------------------------------------------------
# Interpreter choice


def _hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # `import m` now raises ImportError


def test_falls_back_to_tflite_runtime_when_litert_is_missing(built, run_dir, monkeypatch):
    from ai_edge_litert.interpreter import Interpreter as LiteRT

    made = []

    class FakeTfliteInterpreter(LiteRT):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    pkg, sub = types.ModuleType("tflite_runtime"), types.ModuleType("tflite_runtime.interpreter")
    pkg.__version__, sub.Interpreter, pkg.interpreter = "2.14.0", FakeTfliteInterpreter, sub
    _hide(monkeypatch, "ai_edge_litert", "ai_edge_litert.interpreter")
    monkeypatch.setitem(sys.modules, "tflite_runtime", pkg)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", sub)
    r = Runtime.open(run_dir, "encoder.float.tflite", threads=1)
    assert r.interpreter_name == "tflite-runtime" and r.info()["interpreter_version"] == "2.14.0"
    assert made and made[0]["num_threads"] == 1
    x = normalise(images(5))
    np.testing.assert_allclose(r.run(x), built[1](x), atol=1e-5, rtol=0)


def test_missing_interpreters_say_what_to_pip_install(run_dir, monkeypatch):
    _hide(monkeypatch, "ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime",
          "tflite_runtime.interpreter", "onnxruntime")
    with pytest.raises(ArtifactError, match=r"pip install ai-edge-litert \(or tflite-runtime\)$"):
        Runtime.open(run_dir, "encoder.float.tflite")
    with pytest.raises(ArtifactError, match=r"pip install tflite-runtime$"):
        Runtime.open(run_dir, "encoder.float.tflite", interpreter="tflite-runtime")
    with pytest.raises(ArtifactError, match=r"pip install onnxruntime$"):
        Runtime.open(run_dir, "encoder.float.onnx")


def test_interpreter_names_are_checked(run_dir):
    with pytest.raises(ArtifactError, match="onnxruntime cannot run a .tflite artifact"):
        Runtime.open(run_dir, "encoder.float.tflite", interpreter="onnxruntime")
    with pytest.raises(ArtifactError, match="unknown interpreter 'tvm'; choose auto, litert"):
        Runtime.open(run_dir, "encoder.float.onnx", interpreter="tvm")
    with pytest.raises(ArtifactError, match="no artifact 'encoder.int8.tflite'"):
        Runtime.open(run_dir)


# --------------------------------------------------------------------------------------------
# Import hygiene: the runtime is copied into device bundles


def test_importing_the_runtime_does_not_import_torch():
    code = "import sys, qdefend.edge.runtime; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runtime_works_copied_flat_as_in_a_bundle(run_dir, tmp_path):
    from qdefend.devices.bundle import COPIED_FILES

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in COPIED_FILES:
        shutil.copy(Path(rt.__file__).with_name(name), bundle / name)
    code = ("import sys, numpy as np, runtime; "
            f"f = runtime.Runtime.open({str(run_dir)!r}, 'encoder.float.onnx').encode("
            f"np.zeros((3, 1, 12, 12), np.uint8), seed=0); "
            "print(f.q.shape, 'torch' in sys.modules, any(m.startswith('qdefend') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=bundle)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 4, 12, 12) False False"


# --------------------------------------------------------------------------------------------
# A real int8 TFLite file (PTQ with the project's quantizer, converted by litert-torch)


@pytest.mark.slow
def test_int8_tflite_matches_the_torch_int8_model(tmp_path):
    """int8 in/out TFLite: the runtime quantises with the interpreter's input grid, checks it
    against the manifest, dequantises the output; codes equal torch's int8 model within 2 LSB."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize.quant_config import QuantConfig

    from qdefend import quant

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Sigmoid()).eval()
    calib = torch.from_numpy(normalise(images(64)))
    prepared = quant.prepare_ptq(net, calib[:2])
    quant.calibrate(prepared, [calib])
    reference = quant.convert(prepared)
    (tmp_path / "artifacts").mkdir()
    litert_quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
    litert_torch.convert(quant.convert(prepared, fold_quantize=False), (calib[:2],),
                         quant_config=QuantConfig(pt2e_quantizer=litert_quantizer)
                         ).export(str(tmp_path / "artifacts" / "encoder.int8.tflite"))

    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(str(tmp_path / "artifacts" / "encoder.int8.tflite"))
    (s_in, zp_in), (s_out, zp_out) = (d[0]["quantization"] for d in (it.get_input_details(), it.get_output_details()))
    assert (s_out, zp_out) == (OUT_Q["scale"], OUT_Q["zero_point"])  # the sigmoid grid

    def write(in_scale):
        entry = artifact_entry(tmp_path, "artifacts/encoder.int8.tflite", format="tflite", role="encoder",
                               precision="int8", input=_spec("x", SHAPE, "int8", {"scale": in_scale, "zero_point": zp_in}),
                               output=_spec("z", FEAT, "int8", OUT_Q))
        write_manifest(tmp_path, {
            "dataset": {"name": "toy", "num_classes": 2},
            "input": {"shape": SHAPE, "dtype": "float32", "range": [0, 1], "layout": "NCHW",
                      "normalization": {"mean": [MEAN], "std": [STD]}},
            "features": {"shape": FEAT, "wire": wire_quant_params(OUT_Q, [], [0.0, 1.0])},
            "release": {"steps": []}, "artifacts": {"encoder.int8.tflite": entry}})

    write(s_in * 1.01)
    with pytest.raises(ArtifactError, match="input quantisation .* differs from the manifest"):
        Runtime.open(tmp_path)
    write(s_in)
    r = Runtime.open(tmp_path)  # the default artifact
    for n in (1, 7, 64):
        u8 = images(n, seed=n)
        with torch.no_grad():
            want = quantize(reference(torch.from_numpy(normalise(u8))).numpy(), s_out, zp_out)
        f = r.encode(u8)
        assert (f.scale, f.zero_point) == (s_out, zp_out)  # no noise: the wire is the output grid
        # A 1-LSB rounding difference in the conv's int8 output moves the sigmoid by up to
        # 0.25 * 0.0195 / (1/256) = 1.25 LSB: measured 9 of 36,864 codes off (max 2) at n=64.
        assert np.abs(f.q.astype(int) - want).max() <= 2
        assert (f.q == want).mean() > 0.999
    assert r.info()["input"]["quant"] == {"scale": pytest.approx(s_in), "zero_point": zp_in}


# ------------------------------------------------------------------ ONNX Runtime's int8 mode from the CPU


@pytest.mark.parametrize("machine, flags, mode", [
    ("x86_64", {"avx2", "fma"}, "precise"),                   # Zen 1 / Haswell: u8s8 saturates 16-bit sums
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "fast"),   # Zen 4 / Ice Lake
    ("x86_64", {"avx2", "avx_vnni"}, "fast"),                 # Alder Lake (AVX-VNNI)
    ("x86_64", {"avx2", "amx_int8"}, "fast"),                 # Sapphire Rapids
    ("aarch64", set(), "fast"),                               # Pi 4 (no sdot) and Pi 5 alike
])
def test_int8_precision_follows_the_cpus_int8_dot_product(machine, flags, mode, monkeypatch):
    from qdefend.edge.cpu import ort_int8_precision

    monkeypatch.delenv("QDEFEND_ORT_INT8_PRECISION", raising=False)
    p = ort_int8_precision(machine=machine, flags=flags)
    assert p["mode"] == mode and p["source"] == "cpu" and (p["x64quantprecision"] == "1") == (mode == "precise")
    monkeypatch.setenv("QDEFEND_ORT_INT8_PRECISION", "precise")
    assert ort_int8_precision(machine=machine, flags=flags)["mode"] == "precise"
    assert ort_int8_precision("fast", machine=machine, flags=flags)["mode"] == "fast"  # an argument wins
    monkeypatch.setenv("QDEFEND_ORT_INT8_PRECISION", "turbo")
    with pytest.raises(ValueError, match="must be auto, fast or precise"):
        ort_int8_precision(machine=machine, flags=flags)


def test_cpu_flags_read_x86_and_arm_cpuinfo():
    from qdefend.edge.cpu import cpu_flags

    assert cpu_flags("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n") == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags("processor\t: 0\nFeatures\t: fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}
    assert cpu_flags("nothing here") == set()


def test_the_onnx_session_gets_the_chosen_mode_and_records_it(tmp_path, monkeypatch):
    monkeypatch.delenv("QDEFEND_ORT_INT8_PRECISION", raising=False)
    from test_bundle import toy_run

    run = toy_run(tmp_path / "toy")
    x = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    outs = {}
    for mode in ("fast", "precise"):
        r = rt.Runtime.open(run, "encoder.int8.onnx", int8_precision=mode)
        so = r.backend.sess.get_session_options()
        if mode == "precise":
            assert so.get_session_config_entry("session.x64quantprecision") == "1"
        else:
            with pytest.raises(Exception, match="does not have configuration"):
                so.get_session_config_entry("session.x64quantprecision")
        assert r.info()["int8_precision"]["mode"] == mode
        outs[mode] = r.encode(x, release=False).q
    assert rt.Runtime.open(run, "encoder.int8.onnx").int8_precision["source"] == "cpu"
    with pytest.raises(ArtifactError, match="must be auto, fast or precise"):
        rt.Runtime.open(run, "encoder.int8.onnx", int8_precision="max")
    exact = __import__("qdefend.edge.cpu", fromlist=["int8_dot_product"]).int8_dot_product()[0]
    if exact:  # VNNI / AMX / ARM: the fast mode is exact, so both modes give the same codes
        assert np.array_equal(outs["fast"], outs["precise"])
