"""Tests for qdefend.edge.manifest: entries, validation naming the bad key, atomic round trip,
schema/version errors, tamper detection (sha256, size, missing) and the wire quantisation grid.

Pure standard library under test, so these use small dummy artifact files and run in milliseconds.
"""

import copy
import hashlib
import json
import math

import pytest

from qdefend.edge.manifest import (
    MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, ArtifactError, artifact_entry, load_manifest, sha256_file, verify_artifact,
    write_manifest,
)
from qdefend.edge.release import int8_params, wire_quant_params

TFLITE_IN = {"name": "x", "shape": [None, 1, 8, 8], "dtype": "int8", "quant": {"scale": 0.0157, "zero_point": 0}}
TFLITE_OUT = {"name": "z", "shape": [None, 4, 8, 8], "dtype": "int8", "quant": {"scale": 1 / 256, "zero_point": -128}}


def make_manifest(run_dir) -> dict:
    """A complete manifest with one dummy int8 TFLite encoder file under run_dir/artifacts."""
    (run_dir / "artifacts").mkdir(parents=True)
    (run_dir / "artifacts" / "encoder.int8.tflite").write_bytes(bytes(range(256)) * 8)
    entry = artifact_entry(run_dir, "artifacts/encoder.int8.tflite", format="tflite", role="encoder",
                           precision="int8", input=TFLITE_IN, output=TFLITE_OUT, op_counts={"CONV_2D": 1})
    return {
        "run": "toy", "created": "2025-01-01T00:00:00+00:00", "model": {"name": "toy", "cut": 1},
        "dataset": {"name": "fashion-mnist", "num_classes": 2, "class_names": ["a", "b"]},
        "input": {"shape": [1, 8, 8], "dtype": "float32", "range": [0, 1], "layout": "NCHW",
                  "normalization": {"mean": [0.5], "std": [0.25]}},
        "features": {"shape": [4, 8, 8], "wire": {"dtype": "int8", "scale": 0.007, "zero_point": -71}},
        "release": {"steps": [{"type": "gaussian_noise", "sigma": 0.1}]},
        "artifacts": {"encoder.int8.tflite": entry},
        "tools": {"numpy": "2.4"}, "warnings": [], "verification": {"parity_lsb": 0},
    }


@pytest.fixture
def run(tmp_path):
    run_dir = tmp_path / "toy"
    return run_dir, make_manifest(run_dir)


def test_artifact_entry_hashes_the_file_and_keeps_extra_keys(run):
    run_dir, m = run
    entry = m["artifacts"]["encoder.int8.tflite"]
    data = (run_dir / "artifacts" / "encoder.int8.tflite").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() == sha256_file(run_dir / entry["path"])
    assert entry["size_bytes"] == 2048
    assert entry["path"] == "artifacts/encoder.int8.tflite"
    assert entry["op_counts"] == {"CONV_2D": 1}
    assert entry["input"] == TFLITE_IN


def test_round_trip_is_atomic_sorted_and_adds_the_schema(run):
    run_dir, m = run
    path = write_manifest(run_dir, m)
    assert path == run_dir / MANIFEST_NAME
    assert sorted(p.name for p in run_dir.iterdir()) == ["artifacts", MANIFEST_NAME]  # no tmp left
    text = path.read_text()
    assert text.startswith('{\n  "artifacts"')  # sorted keys, indent 2
    loaded = load_manifest(run_dir)
    assert loaded == dict(m, schema=SCHEMA, schema_version=SCHEMA_VERSION)
    assert load_manifest(path) == loaded  # the file path works too


def test_write_fills_defaults_and_converts_numpy_values(tmp_path):
    np = pytest.importorskip("numpy")
    run_dir = tmp_path / "r2"
    m = make_manifest(run_dir)
    for key in ("created", "model", "tools", "warnings", "verification", "run"):
        del m[key]
    m["features"]["wire"]["scale"] = np.float32(0.007)
    m["input"]["shape"] = list(np.array([1, 8, 8]))
    loaded = load_manifest(write_manifest(run_dir, m))
    assert loaded["run"] == "r2" and loaded["warnings"] == [] and loaded["created"].startswith("20")
    assert isinstance(loaded["features"]["wire"]["scale"], float)


@pytest.mark.parametrize("mutate, key", [
    (lambda m: m.pop("dataset"), "'dataset' is missing"),
    (lambda m: m["dataset"].update(num_classes=0), "'dataset.num_classes'"),
    (lambda m: m["dataset"].update(class_names=["a"]), "'dataset.class_names'"),
    (lambda m: m["input"].update(layout="NHWC"), "'input.layout'"),
    (lambda m: m["input"]["normalization"].update(std=[0.0]), "'input.normalization.std'"),
    (lambda m: m["input"]["normalization"].pop("mean"), "'input.normalization.mean' is missing"),
    (lambda m: m["features"]["wire"].update(scale=-1.0), "'features.wire.scale'"),
    (lambda m: m["features"]["wire"].update(zero_point=200), "'features.wire.zero_point'"),
    (lambda m: m["release"]["steps"].append({"type": "blur"}), "'release.steps[1].type'"),
    (lambda m: m["release"]["steps"][0].update(sigma=-0.1), "'release.steps[0].sigma'"),
    (lambda m: m["release"]["steps"].append({"type": "dropout", "p": 1.5}), "'release.steps[1].p'"),
    (lambda m: m["artifacts"]["encoder.int8.tflite"].update(format="pt"), "'artifacts.encoder.int8.tflite.format'"),
    (lambda m: m["artifacts"]["encoder.int8.tflite"].update(path="../x"), "'artifacts.encoder.int8.tflite.path'"),
    (lambda m: m["artifacts"]["encoder.int8.tflite"]["output"].update(quant=None),
     "'artifacts.encoder.int8.tflite.output.quant' is required"),
    (lambda m: m["artifacts"]["encoder.int8.tflite"]["output"].update(shape=[None, 8, 8, 8]),
     "'artifacts.encoder.int8.tflite.output.shape'"),
    (lambda m: m.update(warnings="none"), "'warnings'"),
])
def test_write_refuses_a_bad_manifest_naming_the_key(run, mutate, key):
    run_dir, m = run
    mutate(m)
    with pytest.raises(ArtifactError, match="manifest key") as e:
        write_manifest(run_dir, m)
    assert key in str(e.value)
    assert not (run_dir / MANIFEST_NAME).exists()


def test_artifact_entry_refuses_bad_arguments(run):
    run_dir, _ = run
    rel = "artifacts/encoder.int8.tflite"
    ok = dict(format="tflite", role="encoder", precision="int8", input=TFLITE_IN, output=TFLITE_OUT)
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact_entry(run_dir, "artifacts/nope.onnx", **ok)
    for field, bad, needle in [("role", "tail", ".role"), ("precision", "fp16", ".precision"),
                               ("input", dict(TFLITE_IN, dtype="float64"), ".input.dtype"),
                               ("input", dict(TFLITE_IN, shape=[0, 1]), ".input.shape")]:
        with pytest.raises(ArtifactError, match=needle.replace(".", r"\.")):
            artifact_entry(run_dir, rel, **dict(ok, **{field: bad}))


def test_load_errors_say_what_to_do(run, tmp_path):
    run_dir, m = run
    with pytest.raises(ArtifactError, match=r"no manifest.json in .*toy: run `qdefend export .*toy` first"):
        load_manifest(run_dir)
    path = write_manifest(run_dir, m)
    good = json.loads(path.read_text())

    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        load_manifest(run_dir)
    path.write_text(json.dumps(dict(good, schema="other")))
    with pytest.raises(ArtifactError, match="is not a qdefend manifest"):
        load_manifest(run_dir)
    path.write_text(json.dumps(dict(good, schema_version=SCHEMA_VERSION + 1)))
    with pytest.raises(ArtifactError, match=r"written by a newer qdefend .*pip install -U qdefend"):
        load_manifest(run_dir)
    bad = copy.deepcopy(good)
    del bad["features"]["wire"]
    path.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match=r"'features.wire' is missing.*qdefend export .*toy`"):
        load_manifest(run_dir)


def test_verify_artifact_detects_tampering(run):
    run_dir, m = run
    name = "encoder.int8.tflite"
    path = run_dir / "artifacts" / name
    assert verify_artifact(run_dir, m, name) == path
    data = bytearray(path.read_bytes())

    data[100] ^= 0x01  # flip one bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"encoder.int8.tflite is corrupted or was modified \(sha256 "
                                            r"mismatch\): re-export with `qdefend export .*toy`"):
        verify_artifact(run_dir, m, name)
    path.write_bytes(bytes(data[:1000]))
    with pytest.raises(ArtifactError, match=r"is truncated .*1000 bytes, manifest says 2048"):
        verify_artifact(run_dir, m, name)
    path.unlink()
    with pytest.raises(ArtifactError, match="encoder.int8.tflite is missing"):
        verify_artifact(run_dir, m, name)
    with pytest.raises(ArtifactError, match="no artifact 'encoder.onnx'.*available: encoder.int8.tflite"):
        verify_artifact(run_dir, m, "encoder.onnx")


def test_wire_grid_covers_sigmoid_output_plus_four_sigma():
    w = wire_quant_params({"scale": 1 / 256, "zero_point": -128}, [{"type": "gaussian_noise", "sigma": 0.1}],
                          [0.0, 1.0])
    assert w["dtype"] == "int8"
    assert w["scale"] == pytest.approx(1.8 / 255)
    low, high = (-128 - w["zero_point"]) * w["scale"], (127 - w["zero_point"]) * w["scale"]
    assert low == pytest.approx(-0.4, abs=w["scale"]) and high == pytest.approx(1.4, abs=w["scale"])


def test_wire_grid_is_the_output_grid_without_noise():
    out = {"scale": 1 / 256, "zero_point": -128}
    grid = {"dtype": "int8", "bits": 8, "granularity": "tensor", "order": "release_then_wire", **out}
    assert wire_quant_params(out, [], [0, 1]) == grid
    assert wire_quant_params(out, [{"type": "dropout", "p": 0.5}]) == grid


def test_wire_grid_noise_adds_in_quadrature_and_laplace_uses_its_std():
    steps = [{"type": "gaussian_noise", "sigma": 0.3}, {"type": "laplace_noise", "scale": 0.4 / math.sqrt(2)}]
    w = wire_quant_params(None, steps, [-1.0, 1.0])  # std = sqrt(0.3^2 + 0.4^2) = 0.5 -> [-3, 3]
    assert w["scale"] == pytest.approx(6 / 255)
    assert w["zero_point"] == 0  # round(-128 + 127.5): half to even
    with pytest.raises(ArtifactError, match="needs the encoder output range"):
        wire_quant_params(None, steps)
    with pytest.raises(ArtifactError, match=r"'release.steps\[0\].type'"):
        wire_quant_params(None, [{"type": "blur"}], [0, 1])


def test_int8_params_always_hold_zero():
    p = int8_params(0.5, 2.0)  # widened to [0, 2]
    assert p["zero_point"] == -128 and p["scale"] == pytest.approx(2 / 255)
    assert int8_params(0.0, 0.0)["scale"] == 1.0


def test_device_accuracy_prefers_the_release_then_the_plain_artifact():
    from qdefend.edge.manifest import device_accuracy

    m = {"verification": {"artifacts": {"a.tflite": {"test_acc": 0.88, "test_acc_release": 0.86},
                                        "b.onnx": {"test_acc": 0.87, "test_acc_release": None},
                                        "c.onnx": {}}}}
    assert device_accuracy(m, "a.tflite") == 0.86  # what a device gets: noise / dropout applied
    assert device_accuracy(m, "b.onnx") == 0.87  # no release measured: the plain artifact
    assert device_accuracy(m, "c.onnx") is None and device_accuracy(m, "d.onnx") is None and device_accuracy({}, "a") is None
