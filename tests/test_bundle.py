"""Tests for qdefend.devices.profiles / bundle / runner: device bundles, checked by their standalone runner.

Fast tests bundle a toy run: a hand-built int8 ONNX encoder (int8 in -> conv stride 4 -> sigmoid ->
int8 out, 1x28x28 -> 4x7x7, Gaussian release noise) made in milliseconds with onnx.helper, with
the run's config naming Fashion-MNIST so the reference images are real test images. The slow
tests bundle a tiny real QAT int8 run (Trainer + export_run, about a minute on one core) for the
LiteRT, tflite-runtime and onnxruntime routes. Every bundle is extracted and its runner.py run in a
subprocess with the venv's python, no PYTHONPATH and a working directory outside the repository,
under ``-X importtime`` to prove that neither torch nor qdefend is imported on the device side.
"""

import io
import json
import re
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from qdefend.cli import main
from qdefend.devices.bundle import bundle_top, extract_bundle, make_bundle
from qdefend.edge.manifest import artifact_entry, load_manifest, sha256_file, write_manifest
from qdefend.edge.release import wire_quant_params
from qdefend.devices.profiles import DEVICES, RUNTIME_FORMAT, get_profile
from qdefend.errors import QdefendError

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA = 0.1
SHAPE, FEAT = [1, 28, 28], [4, 7, 7]
IN_Q, OUT_Q = {"scale": 1 / 64, "zero_point": -128}, {"scale": 1 / 256, "zero_point": -128}
LAYOUT = {"encoder.int8.onnx", "manifest.json", "errors.py", "release.py", "runtime.py", "manifest.py", "runner.py", "wire.py", "client.py", "cpu.py",
          "requirements.txt",
          "reference/images.npy", "reference/features.npy", "reference/reference.json", "bundle.json", "README.md"}


def toy_run(root: Path, sigma: float = SIGMA, shape=SHAPE, feat=FEAT) -> Path:
    """A run folder holding a hand-built int8 ONNX encoder, its manifest and a config.toml."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (root / "artifacts").mkdir(parents=True)
    w = np.random.default_rng(0).normal(0, 0.5, (feat[0], shape[0], 3, 3)).astype(np.float32)
    stride = shape[1] // feat[1]
    inits = {"s_in": np.float32(IN_Q["scale"]), "zp_in": np.int8(IN_Q["zero_point"]), "w": w,
             "b": np.zeros(feat[0], np.float32), "s_out": np.float32(OUT_Q["scale"]), "zp_out": np.int8(OUT_Q["zero_point"])}
    nodes = [helper.make_node("DequantizeLinear", ["x", "s_in", "zp_in"], ["xf"]),
             helper.make_node("Conv", ["xf", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[stride, stride]),
             helper.make_node("Sigmoid", ["c"], ["sg"]),
             helper.make_node("QuantizeLinear", ["sg", "s_out", "zp_out"], ["z"])]
    io_ = [helper.make_tensor_value_info(n, TensorProto.INT8, ["batch", *s]) for n, s in (("x", shape), ("z", feat))]
    graph = helper.make_graph(nodes, "toy", io_[:1], io_[1:], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10),
              root / "artifacts" / "encoder.int8.onnx")
    steps = [{"type": "gaussian_noise", "sigma": sigma}] if sigma else []
    entry = artifact_entry(root, "artifacts/encoder.int8.onnx", format="onnx", role="encoder", precision="int8",
                           input={"name": "x", "shape": [None, *shape], "dtype": "int8", "quant": IN_Q},
                           output={"name": "z", "shape": [None, *feat], "dtype": "int8", "quant": OUT_Q})
    write_manifest(root, {"dataset": {"name": "fashion-mnist", "num_classes": 10},
                          "input": {"shape": shape, "dtype": "float32", "range": [0, 1], "layout": "NCHW",
                                    "normalization": {"mean": [0.29], "std": [0.35]}},
                          "features": {"shape": feat, "wire": wire_quant_params(OUT_Q, steps, [0.0, 1.0])},
                          "release": {"steps": steps}, "artifacts": {"encoder.int8.onnx": entry}})
    (root / "config.toml").write_text('[data]\nname = "fashion-mnist"\n')
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return toy_run(tmp_path_factory.mktemp("runs") / "toy")


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory):
    """(archive, extracted folder) of the rpi5 onnxruntime bundle of the toy run."""
    archive = make_bundle(run_dir, "rpi5", fmt="onnx", out=tmp_path_factory.mktemp("out"))
    return archive, extract_bundle(archive, tmp_path_factory.mktemp("device"))


def runner(root: Path, *args, timeout=120):
    """runner.py in a fresh interpreter: no PYTHONPATH, cwd outside the repo, imports timed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-X", "importtime", str(root / "runner.py"), *map(str, args)],
                          env=env, cwd=root.parent, capture_output=True, text=True, timeout=timeout)


def imported(stderr: str) -> set[str]:
    return {ln.split("|")[-1].strip() for ln in stderr.splitlines() if ln.startswith("import time:")}


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Profiles


@pytest.mark.parametrize("name", DEVICES.names())
def test_every_profile_is_consistent(name):
    p = get_profile(name)
    assert p.python_tag == "cp311" and p.python_version == "3.11"
    assert all(t.endswith("_" + p.arch) for t in p.platforms)
    if not p.wheels:
        with pytest.raises(QdefendError, match="no pip wheels for any interpreter"):
            p.choose()
        return
    fmt, rt = p.choose()
    assert (fmt, rt) == (p.format, p.runtime) and RUNTIME_FORMAT[rt] == fmt
    for r in p.wheels:
        assert p.choose(runtime=r) == (RUNTIME_FORMAT[r], r)
        assert any(line.startswith("numpy==") for line in p.requirements(r))


def test_profile_facts():
    assert get_profile("rpi4").qemu_cpu == "cortex-a72" and get_profile("rpi5").qemu_cpu == "cortex-a76"
    assert get_profile("x86_64").qemu_cpu is None and get_profile("rpi5").glibc == "2.36"
    assert "manylinux_2_34_aarch64" in get_profile("rpi5").platforms
    assert get_profile("rpi4").requirements("tflite-runtime") == ["tflite-runtime==2.14.0", "numpy==1.26.4"]
    assert get_profile("rpi5").requirements("litert")[0] == "ai-edge-litert==2.3.0"
    assert get_profile("x86_64").choose(fmt="onnx") == ("onnx", "onnxruntime")


def test_cli_lists_devices(capsys):
    assert main(["list", "devices"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("rpi4", "rpi5", "android-arm64", "generic-aarch64", "x86_64", "phone-web"))


def test_unknown_device_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(QdefendError, match="Valid devices: android-arm64, generic-aarch64, phone-web, rpi4, rpi5, x86_64"):
        make_bundle(tmp_path, "raspberry")
    assert main(["bundle", str(tmp_path), "--device", "rpi6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Did you mean 'rpi5'" in err


@pytest.mark.parametrize("device, kw, needle", [
    ("generic-aarch64", {"runtime": "tflite-runtime"}, "tflite-runtime has no cp311 wheel for generic-aarch64 .*use --runtime litert$"),
    ("rpi5", {"runtime": "litert", "fmt": "onnx"}, "litert runs .tflite files, not .onnx: use --format tflite or --runtime onnxruntime"),
    ("rpi5", {"runtime": "tensorrt"}, "unknown runtime 'tensorrt'; valid runtimes: litert, tflite-runtime, onnxruntime"),
    ("rpi5", {"fmt": "coreml"}, "use --format tflite or --format onnx"),
    ("android-arm64", {}, "android-arm64 has no pip wheels .*--device phone-web.*LiteRT Android library.*--device generic-aarch64"),
])
def test_runtimes_without_wheels_name_what_to_pick(tmp_path, device, kw, needle):
    with pytest.raises(QdefendError, match=needle) as e:
        make_bundle(tmp_path, device, **kw)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# The bundle


def test_bundle_layout_hashes_and_pins(bundle, run_dir):
    archive, root = bundle
    assert archive.name == "qdefend-bundle-toy-rpi5.tar.gz" and root.name == "qdefend-bundle-toy-rpi5"
    with tarfile.open(archive) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
        assert all(m.uid == 0 and m.uname == "" for m in tar.getmembers())
    assert names == {f"{root.name}/{n}" for n in LAYOUT}
    b = json.loads((root / "bundle.json").read_text())
    assert set(b["files"]) == LAYOUT - {"bundle.json"}
    for rel, meta in b["files"].items():
        assert sha256_file(root / rel) == meta["sha256"], rel
    assert (b["device"]["name"], b["runtime"], b["format"], b["threads"]) == ("rpi5", "onnxruntime", "onnx", 4)
    assert b["device"]["qemu_cpu"] == "cortex-a76" and b["qdefend_version"] and b["created"]
    run_m, m = load_manifest(run_dir), load_manifest(root)
    assert list(m["artifacts"]) == ["encoder.int8.onnx"] and m["artifacts"]["encoder.int8.onnx"]["path"] == "encoder.int8.onnx"
    assert m["artifacts"]["encoder.int8.onnx"]["sha256"] == run_m["artifacts"]["encoder.int8.onnx"]["sha256"]
    assert m["release"] == run_m["release"] == {"steps": [{"type": "gaussian_noise", "sigma": SIGMA}]}
    assert (root / "requirements.txt").read_text().split() == ["onnxruntime==1.31.1", "numpy==2.4.6"]
    import qdefend.edge

    edge_dir = Path(qdefend.edge.__file__).parent
    for name in ("errors.py", "release.py", "runtime.py", "manifest.py", "runner.py"):
        assert (root / name).read_bytes() == (edge_dir / name).read_bytes(), name
    assert "python runner.py --check" in (root / "README.md").read_text()
    ref = json.loads((root / "reference/reference.json").read_text())
    images, feats = np.load(root / "reference/images.npy"), np.load(root / "reference/features.npy")
    assert images.dtype == np.uint8 and images.shape == (8, *SHAPE) and feats.dtype == np.int8
    assert feats.shape == (8, *FEAT) and ref["source"] == "fashion-mnist test[0:6] + all-0 + all-255"
    assert (images[6] == 0).all() and (images[7] == 255).all() and images[:6].std() > 50
    assert (ref["scale"], ref["zero_point"]) == (m["features"]["wire"]["scale"], m["features"]["wire"]["zero_point"])


def test_bundling_is_reproducible_apart_from_the_time(run_dir, bundle, tmp_path):
    again = extract_bundle(make_bundle(run_dir, "rpi5", fmt="onnx", out=tmp_path / "b.tar.gz"), tmp_path)
    first = json.loads((bundle[1] / "bundle.json").read_text())["files"]
    second = json.loads((again / "bundle.json").read_text())["files"]
    assert {k: v for k, v in first.items() if k != "README.md"} == {k: v for k, v in second.items() if k != "README.md"}


def assert_check_passes(root: Path, interpreter: str, device: str, n_values: int) -> dict:
    """runner.py --check passes bit-exact, standalone: neither torch nor qdefend imported."""
    p = runner(root, "--check")
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    res = last_json(p.stdout)
    assert res["ok"] is True and res["files_checked"] == len(json.loads((root / "bundle.json").read_text())["files"])
    assert res["parity"] == {"images": 8, "values": n_values, "mismatches": 0, "max_abs_lsb": 0,
                             "same_quant_params": True, "bit_identical": True,
                             "reference_interpreter": res["parity"]["reference_interpreter"]}
    assert res["interpreter"] == interpreter and res["device"] == device and res["numpy"]
    mods = imported(p.stderr)
    assert "numpy" in mods and "runtime" in mods and "manifest" in mods
    assert not any(m == "torch" or m.startswith(("torch.", "qdefend")) for m in mods)
    assert not (root / "__pycache__").exists()
    return res


def test_runner_check_passes_standalone_without_torch_or_qdefend(bundle):
    res = assert_check_passes(bundle[1], "onnxruntime", "rpi5", 8 * 4 * 7 * 7)
    assert res["files_checked"] == len(LAYOUT) - 1 and res["machine"] == os.uname().machine


@pytest.mark.parametrize("victim", ["encoder.int8.onnx", "runtime.py", "reference/features.npy"])
def test_check_names_a_tampered_file(bundle, tmp_path, victim):
    root = Path(shutil.copytree(bundle[1], tmp_path / bundle[1].name))
    data = bytearray((root / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / victim).write_bytes(bytes(data))
    p = runner(root, "--check")
    res = last_json(p.stdout)
    assert p.returncode == 1 and res["ok"] is False
    assert f"1 file failed the integrity check: {victim} (sha256 differs from bundle.json" in res["error"]
    assert "parity" not in res  # nothing from the bundle was loaded


def test_check_fails_when_the_device_computes_other_codes(bundle, tmp_path):
    """A reference re-signed in bundle.json (so every hash matches) but one code off: parity fails."""
    root = Path(shutil.copytree(bundle[1], tmp_path / bundle[1].name))
    feats = np.load(root / "reference/features.npy")
    feats.flat[5] = feats.flat[5] + 1 if feats.flat[5] < 127 else 126
    np.save(root / "reference/features.npy", feats)
    b = json.loads((root / "bundle.json").read_text())
    b["files"]["reference/features.npy"] = {"sha256": sha256_file(root / "reference/features.npy"),
                                            "size_bytes": (root / "reference/features.npy").stat().st_size}
    (root / "bundle.json").write_text(json.dumps(b))
    p = runner(root, "--check")
    res = last_json(p.stdout)
    assert p.returncode == 1 and res["ok"] is False
    assert res["parity"]["mismatches"] == 1 and res["parity"]["max_abs_lsb"] == 1
    assert res["error"].startswith("parity failed: 1 of 1568 int8 features differ from the reference (max 1 LSB")


def test_encode_npy_png_and_folders(bundle, tmp_path):
    root = bundle[1]
    from PIL import Image

    images = np.load(root / "reference/images.npy")
    np.save(tmp_path / "a.npy", images[0, 0])  # H x W
    np.save(tmp_path / "b.npy", np.moveaxis(images[1], 0, -1))  # H x W x C
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(images[2, 0]).save(folder / "c.png")
    np.save(folder / "d.npy", images[3:6])  # a batch N x C x H x W
    p = runner(root, "encode", tmp_path / "a.npy", tmp_path / "b.npy", folder, "--out", tmp_path / "f.npz", "--no-release")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["images"] == 6
    out = np.load(tmp_path / "f.npz")
    assert list(out["names"]) == ["a.npy", "b.npy", "c.png", "d.npy[0]", "d.npy[1]", "d.npy[2]"]
    assert out["features"].dtype == np.int8
    np.testing.assert_array_equal(out["features"], np.load(root / "reference/features.npy")[:6])
    wire = load_manifest(root)["features"]["wire"]
    assert (float(out["scale"]), int(out["zero_point"])) == (wire["scale"], wire["zero_point"])

    def noisy(seed):
        assert runner(root, "encode", tmp_path / "a.npy", "--out", tmp_path / "n.npz", "--seed", seed).returncode == 0
        return np.load(tmp_path / "n.npz")["features"]

    a, b = noisy(1), noisy(1)
    np.testing.assert_array_equal(a, b)  # seeded release noise
    diff = (a.astype(int) - out["features"][:1]) * wire["scale"]
    assert 0.8 * SIGMA < diff.std() < 1.2 * SIGMA  # the release transform (sigma 0.1) was applied


@pytest.mark.parametrize("shape, needle", [
    ((32, 32, 3), "image is 32x32 with 3 channels, the encoder takes 28x28 with 1: resize it to 28x28 and "
                  "convert it to 1 channel (greyscale)"),
    ((1, 30, 28), "image is 30x28 with 1 channel, the encoder takes 28x28 with 1: resize it to 28x28"),
    ((3, 28, 28), "image is 28x28 with 3 channels, the encoder takes 28x28 with 1: convert it to 1 channel"),
    ((28, 28, 3), "image is 28x28 with 3 channels, the encoder takes 28x28 with 1: convert it to 1 channel"),
])
def test_wrong_image_shape_is_one_clear_line(bundle, tmp_path, shape, needle):
    np.save(tmp_path / "bad.npy", np.zeros(shape, np.uint8))
    p = runner(bundle[1], "encode", tmp_path / "bad.npy", "--out", tmp_path / "f.npz")
    assert p.returncode == 2 and not (tmp_path / "f.npz").exists()
    err = [ln for ln in p.stderr.splitlines() if not ln.startswith("import time:")]
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'bad.npy'}: {needle}")


def test_png_without_pillow_and_missing_inputs_say_what_to_do(bundle, tmp_path):
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "PIL.py").write_text("raise ImportError('hidden for the test')\n")
    np.save(tmp_path / "x.npy", np.zeros(SHAPE, np.uint8))
    from PIL import Image

    Image.fromarray(np.zeros(SHAPE[1:], np.uint8)).save(tmp_path / "x.png")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "hide"))
    p = subprocess.run([sys.executable, str(bundle[1] / "runner.py"), "encode", str(tmp_path / "x.png"),
                        "--out", str(tmp_path / "f.npz")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "reading .png images needs Pillow (pip install pillow); or save the image as .npy" in p.stderr
    p = runner(bundle[1], "encode", tmp_path / "nothing.npy", "--out", tmp_path / "f.npz")
    assert p.returncode == 2 and "nothing.npy: no such file or folder" in p.stderr


def test_bench_reports_latency_percentiles_and_peak_memory(bundle):
    p = runner(bundle[1], "--bench", "--repeats", 20, "--batch", 4)
    assert p.returncode == 0, p.stderr[-2000:]
    res = last_json(p.stdout)
    lat = res["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] and res["batch"] == 4 and res["repeats"] == 20
    assert res["peak_rss_mb"] > 10 and res["memory_budget_mb"] == 1024 and res["threads"] == 4
    assert res["within_budget"] is (res["peak_rss_mb"] <= res["memory_budget_mb"]) and res["images_per_s"] > 0


def test_cli_bundle_and_a_run_without_the_format(run_dir, tmp_path, capsys):
    assert main(["bundle", str(run_dir), "--device", "x86_64", "--format", "onnx", "--out", str(tmp_path / "x.tar.gz")]) == 0
    assert "runner.py --check" in capsys.readouterr().out.replace("\n", " ")
    b = json.loads((extract_bundle(tmp_path / "x.tar.gz", tmp_path) / "bundle.json").read_text())
    assert (b["device"]["name"], b["runtime"], b["device"]["platforms"][0]) == ("x86_64", "onnxruntime", "manylinux_2_17_x86_64")
    with pytest.raises(QdefendError, match=r"has no encoder.int8.tflite: run `qdefend export .* --format onnx,tflite`"
                                           r", or pass --format onnx \(the run has encoder.int8.onnx\)"):
        make_bundle(run_dir, "rpi5")
    assert not (run_dir / "bundles").exists()


# --------------------------------------------------------------------------------------------
# --with-wheels (the download is replaced: no network in tests)


def test_with_wheels_fills_wheels_and_lists_their_hashes(run_dir, tmp_path, monkeypatch):
    import qdefend.devices.bundle as B

    calls = []

    def fake_download(requirements, profile, dest):
        calls.append((requirements, profile.platforms))
        dest.mkdir(parents=True)
        whl = dest / "onnxruntime-1.31.1-cp311-cp311-manylinux_2_27_aarch64.whl"
        whl.write_bytes(b"not really a wheel")
        return [whl]

    monkeypatch.setattr(B, "download_wheels", fake_download)
    root = extract_bundle(make_bundle(run_dir, "rpi4", fmt="onnx", out=tmp_path, with_wheels=True), tmp_path / "dev")
    assert calls == [(["onnxruntime==1.31.1", "numpy==2.4.6"], get_profile("rpi4").platforms)]
    b = json.loads((root / "bundle.json").read_text())
    assert b["wheels"] == ["onnxruntime-1.31.1-cp311-cp311-manylinux_2_27_aarch64.whl"]
    assert "wheels/" + b["wheels"][0] in b["files"]
    assert "pip install --no-index --find-links wheels -r requirements.txt" in (root / "README.md").read_text()


def test_with_wheels_without_network_says_what_to_do(run_dir, tmp_path, monkeypatch):
    import qdefend.devices.bundle as B

    seen = []

    def no_network(cmd, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying ...\nERROR: Could not find a version "
                                           "that satisfies the requirement onnxruntime==1.31.1\n")

    monkeypatch.setattr(B.subprocess, "run", no_network)
    with pytest.raises(QdefendError, match=r"pip download of the rpi5 wheels failed \(ERROR: Could not find .*\): "
                                           r"--with-wheels needs network access"):
        make_bundle(run_dir, "rpi5", fmt="onnx", out=tmp_path / "w.tar.gz", with_wheels=True)
    assert not (tmp_path / "w.tar.gz").exists()
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.11" and cmd[cmd.index("--implementation") + 1] == "cp"
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"] == list(get_profile("rpi5").platforms)


# --------------------------------------------------------------------------------------------
# Archives


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> Path:
    """A .tar.gz with (name, data, type) members; type tarfile.REGTYPE/DIRTYPE/SYMTYPE."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data or b"") if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize("members, needle", [
    ([("qdefend-bundle-a-rpi5/x", b"1", tarfile.REGTYPE), ("qdefend-bundle-a-rpi5/../../evil.txt", b"2", tarfile.REGTYPE)],
     "member 'qdefend-bundle-a-rpi5/../../evil.txt' points outside the bundle folder"),
    ([("/tmp/evil.txt", b"2", tarfile.REGTYPE)], "member '/tmp/evil.txt' points outside"),
    ([("qdefend-bundle-a-rpi5/link", None, tarfile.SYMTYPE)], "is a link or special file"),
    ([("somewhere/x", b"1", tarfile.REGTYPE)], "not a qdefend bundle"),
])
def test_extract_refuses_members_outside_the_bundle(tmp_path, members, needle):
    archive = _tar(tmp_path / "bad.tar.gz", members)
    dest = tmp_path / "dest"
    with pytest.raises(QdefendError, match=needle):
        extract_bundle(archive, dest)
    with pytest.raises(QdefendError, match=needle):
        bundle_top(archive)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()


def test_extract_refuses_a_file_that_is_not_an_archive(tmp_path):
    (tmp_path / "x.tar.gz").write_text("hello")
    with pytest.raises(QdefendError, match="is not a .tar.gz bundle"):
        extract_bundle(tmp_path / "x.tar.gz", tmp_path)


# --------------------------------------------------------------------------------------------
# A tiny real QAT int8 run (slow: training + export take about a minute on one core)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """Narrow VGG11-BN split (cut 2, bottleneck 8 + Sigmoid) QAT-trained one epoch on 128 real
    Fashion-MNIST images with Gaussian release noise, exported to int8 TFLite and ONNX."""
    from conftest import tiny_exported_run

    return tiny_exported_run(tmp_path_factory.mktemp("runs") / "tiny", images=128, sigma=SIGMA, num_threads=1)


@pytest.mark.slow
@pytest.mark.parametrize("device, runtime, interpreter", [
    ("rpi5", None, "litert"),  # the default: LiteRT on the int8 .tflite
    ("rpi4", "tflite-runtime", None),  # not installable beside numpy 2: checked in a numpy 1.26 venv by hand
    ("generic-aarch64", "onnxruntime", "onnxruntime"),
])
def test_real_qat_run_bundles_pass_their_check_bit_exact(qat_run, tmp_path, device, runtime, interpreter):
    archive = make_bundle(qat_run, device, runtime=runtime)
    assert archive == qat_run / "bundles" / f"qdefend-bundle-tiny-{device}.tar.gz"
    root = extract_bundle(archive, tmp_path)
    b = json.loads((root / "bundle.json").read_text())
    fmt = "onnx" if runtime == "onnxruntime" else "tflite"
    assert b["runtime"] == (runtime or "litert") and b["artifact"] == f"encoder.int8.{fmt}"
    assert load_manifest(root)["artifacts"][f"encoder.int8.{fmt}"]["sha256"] == \
        load_manifest(qat_run)["artifacts"][f"encoder.int8.{fmt}"]["sha256"]
    if runtime == "tflite-runtime":  # its reference comes from LiteRT's builtin kernels, which it runs
        assert b["reference"]["kernels"].startswith("builtin") and "numpy==1.26.4" in b["requirements"]
        p = runner(root, "--check")
        assert p.returncode == 1 and "pip install tflite-runtime" in last_json(p.stdout)["error"]
        return
    res = assert_check_passes(root, interpreter, device, 8 * 8 * 7 * 7)
    assert res["parity"]["reference_interpreter"].startswith(interpreter)
    p = runner(root, "encode", root / "reference" / "images.npy", "--out", tmp_path / "f.npz", "--seed", 0)
    assert p.returncode == 0, p.stderr[-2000:]
    noisy, clean = np.load(tmp_path / "f.npz")["features"], np.load(root / "reference" / "features.npy")
    scale = load_manifest(root)["features"]["wire"]["scale"]
    assert noisy.shape == clean.shape == (8, 8, 7, 7)
    assert 0.8 * SIGMA < ((noisy.astype(int) - clean) * scale).std() < 1.2 * SIGMA


def test_phone_web_bundle_is_a_static_page_with_the_onnx_encoder(tmp_path):
    """Fast twin of the browser test's bundle check: layout, sha256s, the page marked as a bundle."""
    from test_serve import toy_served_run

    run = toy_served_run(tmp_path / "run")
    archive = make_bundle(run, "phone-web", out=tmp_path / "out", server="https://cloud.example:8443")
    root = extract_bundle(archive, tmp_path / "x")
    b = json.loads((root / "bundle.json").read_text())
    assert b["device"]["kind"] == "browser" and b["server"] == "https://cloud.example:8443"
    for rel, meta in b["files"].items():
        assert sha256_file(root / rel) == meta["sha256"], rel
    assert {"index.html", "static/qdefend.js", "static/release.js", "static/ort/ort.wasm.min.mjs",
            "encoder.int8.onnx", "client-manifest.json", "README.md"} <= set(b["files"])
    html = (root / "index.html").read_text()
    assert '<meta name="qdefend-bundle" content="1">' in html and 'content="https://cloud.example:8443"' in html
    cm = json.loads((root / "client-manifest.json").read_text())
    assert list(cm["encoders"]) == ["encoder.int8.onnx"]
    assert cm["encoders"]["encoder.int8.onnx"]["sha256"] == sha256_file(root / "encoder.int8.onnx")
    for js in ("qdefend.js", "release.js"):  # everything the page loads is in the bundle: no remote URL
        assert not re.search(r"https?://", (root / "static" / js).read_text()), js


@pytest.mark.parametrize("kw, needle", [({"fmt": "tflite"}, "drop --format"),
                                        ({"server": "cloud:8000"}, "must look like https://HOST:PORT"),
                                        ({"server": 'https://x"><script>'}, "must look like")])
def test_phone_web_bundle_refuses_what_it_cannot_honour(tmp_path, run_dir, kw, needle):
    with pytest.raises(QdefendError, match=needle):
        make_bundle(run_dir, "phone-web", out=tmp_path, **kw)
