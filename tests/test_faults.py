"""Bad input and faults: every user mistake is one line on stderr and exit != 0, never a traceback;
nonsense never exits 0; a kill between a checkpoint and its metrics line loses nothing; a diverging
run stops with the last good checkpoint kept; a data pickle cannot run code.

CLI usage errors go through the console script in a subprocess, as a user meets them; the rest call
``qdefend.cli.main`` in-process (the same code behind the same handler) on a tiny real run.
"""

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qdefend.checkpoint import load_checkpoint
from qdefend.cli import main
from qdefend.config import RunConfig
from qdefend.data import DataConfig, load_dataset
from qdefend.errors import NonFiniteLossError, QdefendError
from qdefend.run import RunPaths
from qdefend.train import Trainer, state_finite

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--set", "data.limit_train=256", "--set", "data.limit_test=200", "--set", "data.val_size=100",
        "--set", "data.aux_size=100", "--set", "model.width=0.25", "--set", "model.head_width=0.25",
        "--set", "train.batch_size=64", "--threads", "1", "--quiet"]


def one_line_error(capsys, rc: int, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert "Traceback" not in err
    return err


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1"}
    env.pop("QDEFEND_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "qdefend.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch int8 QAT run on 256 real images (copy it before changing it)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", "--out", str(out), "--epochs", "1", *TINY]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# ------------------------------------------------------------------------------ CLI usage errors

@pytest.mark.parametrize("argv, needle", [
    (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["train", "--seed", "1.5"], "Invalid value for '--seed'"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["attack"], "Missing argument 'run'"),
    (["export", "runs/x", "--verify-images", "many"], "Invalid value for '--verify-images'"),
])
def test_usage_errors_are_one_line_through_the_console_script(argv, needle):
    p = cli(*argv)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and needle in err and "--help" in err, err


def test_bare_command_shows_help_and_a_typo_does_not_exit_0():
    p = cli()
    assert p.returncode == 0 and "Usage" in p.stdout
    assert cli("lsit", "attacks").returncode == 2


def test_binary_config_file_is_refused_in_one_line(tmp_path):
    f = tmp_path / "config.toml"
    f.write_bytes(bytes(range(256)) * 4)
    p = cli("train", "--config", str(f), "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "not a text file" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ config values

@pytest.mark.parametrize("extra, needle", [
    (["--set", "train.lr=nan"], "train.lr must be a finite number"),
    (["--set", "train.lr=inf"], "train.lr must be a finite number"),
    (["--set", "train.weight_decay=-inf"], "finite"),
    (["--defense", "noise", "--set", "defense.params.noise.sigma=nan"], "sigma must be a finite number"),
    (["--set", "train.milestones=[1, \"two\"]"], "train.milestones[1] must be int"),
    (["--set", "train.milestones=3"], "train.milestones must be a list"),
    (["--set", "train.epochs=true"], "train.epochs must be int"),
    (["--threads", "-2"], "num_threads (0: torch's default) must be an integer >= 0"),
    (["--set", "train.keep_checkpoints=0"], "keep_checkpoints must be an integer >= 1"),
])
def test_bad_config_values_are_refused(extra, needle, tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "r"), *extra])
    one_line_error(capsys, rc, needle)
    assert not (tmp_path / "r").exists()


def test_bad_config_file_in_a_run_is_refused(run, capsys):
    (run / "config.toml").write_bytes(b"\xff\xfe\x00garbage")
    one_line_error(capsys, main(["export", str(run)]), "not a text file")


def test_attack_parameters_are_type_checked(run, capsys):
    one_line_error(capsys, main(["attack", str(run), "--attack", "decoder", "--set", "lr=nan"]),
                   "decoder.lr must be a finite number")
    one_line_error(capsys, main(["attack", str(run), "--attack", "decoder", "--set", "epochs=2.5"]),
                   "decoder.epochs must be int")


# ------------------------------------------------------------------------------ files a run reads

@pytest.mark.parametrize("content", ["", "{}", "[]", '"epoch-0001"', '{"tag": 3}', '{"tag": "../../etc"}',
                                     "\x00\x01garbage"])
def test_corrupt_latest_json_is_refused(run, content, capsys):
    (run / "checkpoints" / "latest.json").write_text(content)
    err = one_line_error(capsys, main(["train", "--out", str(run), "--resume", "--epochs", "2"]), "latest.json")
    assert "epoch-0001" in err  # it names the checkpoint to point at


@pytest.mark.parametrize("content", ["", "{}", "[1, 2]", '{"epoch": 1, "step": 4}', "not json at all"])
def test_corrupt_state_json_is_refused(run, content, capsys):
    (run / "checkpoints" / "epoch-0001" / "state.json").write_text(content)
    one_line_error(capsys, main(["train", "--out", str(run), "--resume", "--epochs", "2"]), "state.json")


def test_empty_state_json_does_not_skip_the_sha256_check(run, capsys):
    d = run / "checkpoints" / "epoch-0001"
    state = json.loads((d / "state.json").read_text())
    state.pop("files")
    (d / "state.json").write_text(json.dumps(state))
    one_line_error(capsys, main(["export", str(run)]), "state.json")


def test_garbage_metrics_line_is_named_and_a_torn_last_line_tolerated(run, capsys):
    paths = RunPaths(run)
    lines = paths.metrics.read_text().splitlines()
    paths.metrics.write_text("\n".join(lines) + '\n{"event": "epo')  # killed mid-write
    assert [r["event"] for r in paths.read_metrics()] == ["epoch", "test"]
    paths.metrics.write_text("\n".join([lines[0], "%%% garbage %%%", *lines[1:]]) + "\n")
    with pytest.raises(QdefendError, match=r"metrics.jsonl line 2 is not a metrics record"):
        paths.read_metrics()
    # a resume repairs it: the bad line goes, every epoch line is there
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    assert [r.get("epoch") for r in paths.read_metrics() if r["event"] == "epoch"] == [1, 2]


def _idx(path: Path, a: np.ndarray, code: int) -> None:
    raw = struct.pack(">BBBB", 0, 0, code, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    path.write_bytes(raw + a.astype({0x08: ">u1", 0x0D: ">f4"}[code]).tobytes())


def test_float_idx_images_name_the_real_reason(tmp_path):
    x, y = np.zeros((4, 28, 28)), np.arange(4)
    for stem, a, code in (("train-images-idx3-ubyte", x, 0x0D), ("train-labels-idx1-ubyte", y, 0x08),
                          ("t10k-images-idx3-ubyte", x, 0x08), ("t10k-labels-idx1-ubyte", y, 0x08)):
        _idx(tmp_path / stem, a, code)
    with pytest.raises(QdefendError, match=r"train-images-idx3-ubyte holds >?float32 values.*0x08"):
        load_dataset(DataConfig(name="mnist", data_dir=str(tmp_path), val_size=1, aux_size=1))


def test_corrupt_first_image_of_an_image_folder(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(QdefendError, match=r"cannot read image .*0\.png"):
        load_dataset(DataConfig(name="imagefolder", data_dir=str(tmp_path), val_size=1, aux_size=1))


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.random.default_rng(0).random(16).tolist())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("name, make", [
    ("random.onnx", lambda p: p.write_bytes(np.random.default_rng(1).bytes(3000))),
    ("empty.onnx", lambda p: p.write_bytes(b"")),
    ("truncated.onnx", lambda p: (_tiny_onnx(p), p.write_bytes(p.read_bytes()[:40]))),
    ("random.tflite", lambda p: p.write_bytes(np.random.default_rng(2).bytes(3000))),
    ("empty.tflite", lambda p: p.write_bytes(b"")),
    ("header.tflite", lambda p: p.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 24)),
])
def test_inspect_of_a_broken_artifact_is_one_line(name, make, tmp_path, capsys):
    p = tmp_path / name
    make(p)
    one_line_error(capsys, main(["inspect", str(p)]), "export it again")


def test_inspect_of_a_sound_onnx_outside_a_run_still_works(tmp_path, capsys):
    _tiny_onnx(tmp_path / "ok.onnx")
    assert main(["inspect", str(tmp_path / "ok.onnx")]) == 0


def test_export_verify_images_zero_is_refused_before_anything_is_written(run, capsys):
    one_line_error(capsys, main(["export", str(run), "--verify-images", "0"]), "--verify-images 0 is out of range")
    assert not (run / "manifest.json").exists() and not (run / "artifacts").exists()


# ------------------------------------------------------------------------------ resume semantics

def test_resume_applies_lr_and_epochs_and_records_them(run, capsys):
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--set", "train.lr=0.01"]) == 0
    cfg = RunConfig.load(run / "config.toml")
    assert cfg.train.lr == 0.01 and cfg.train.epochs == 2
    recs = RunPaths(run).read_metrics()
    resumed = [r for r in recs if r["event"] == "resume"]
    assert resumed == [{"event": "resume", "after_epoch": 1,
                        "changed": {"train.epochs": [1, 2], "train.lr": [0.05, 0.01]}}]
    ep2 = [r for r in recs if r["event"] == "epoch" and r["epoch"] == 2][0]
    assert ep2["lr"] <= 0.01  # the lowered rate (cosine-annealed) trained epoch 2


@pytest.mark.parametrize("extra, needle", [
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--set", "model.width=0.5"], "cannot change model.width"),
    (["--set", "train.batch_size=32"], "cannot change train.batch_size"),
    (["--set", "defense.stack=noise"], "cannot change defense.stack"),
    (["--model", "resnet18"], "--model cannot be given"),
    (["--sigma", "0.2"], "--sigma cannot be given"),
    (["--set", "train.lr=nan"], "finite"),
])
def test_resume_refuses_what_would_make_another_run(run, extra, needle, capsys):
    before = (run / "config.toml").read_text()
    one_line_error(capsys, main(["train", "--out", str(run), "--resume", *extra]), needle)
    assert (run / "config.toml").read_text() == before


def test_resume_refuses_fewer_epochs_than_trained(run, capsys):
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2"]) == 0
    capsys.readouterr()
    one_line_error(capsys, main(["train", "--out", str(run), "--resume", "--epochs", "1"]),
                   "fewer than the 2 epochs")


# ------------------------------------------------------------------------------ atomicity

def test_kill_between_checkpoint_and_metrics_line_loses_nothing(run, monkeypatch):
    real_log = Trainer._log

    def dying_log(self, rec):  # the process dies right after epoch 2's checkpoint
        if rec.get("event") == "epoch" and rec.get("epoch") == 2:
            raise KeyboardInterrupt
        real_log(self, rec)

    monkeypatch.setattr(Trainer, "_log", dying_log)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3"]) == 130  # as Ctrl-C / a kill
    paths = RunPaths(run)
    assert [r["epoch"] for r in paths.read_metrics() if r["event"] == "epoch"] == [1]
    _, _, state = load_checkpoint(paths.checkpoints, "latest")
    assert state["epoch"] == 2
    monkeypatch.setattr(Trainer, "_log", real_log)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    epochs = [r for r in paths.read_metrics() if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[1] == state["metrics"]  # epoch 2's line, from its checkpoint


# ------------------------------------------------------------------------------ divergence

def _tiny_cfg(qat: str, **train) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"limit_train": 256, "limit_test": 200, "val_size": 100, "aux_size": 100},
        "model": {"width": 0.25, "head_width": 0.25}, "quant": {"scheme": qat},
        "train": {"epochs": 2, "batch_size": 64, **train},
    })


@pytest.mark.parametrize("qat", ["int8", "none"])
def test_exploding_loss_stops_with_exit_2_and_a_finite_checkpoint(qat, tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["train", "--out", str(out), "--qat", qat, "--epochs", "2", *TINY, "--set", "train.lr=50"])
    err = one_line_error(capsys, rc, "training diverged")
    assert "--resume --set train.lr=5" in err
    parts, _, state = load_checkpoint(out / "checkpoints", "latest")
    assert all(state_finite(k, v) for p in parts.values() for k, v in p.items())
    assert not any(r["event"] == "test" for r in RunPaths(out).read_metrics())  # no result claimed


@pytest.mark.parametrize("qat", ["int8", "none"])
def test_nan_activations_stop_training_before_the_observers_assert(qat, tmp_path, monkeypatch):
    """Under QAT a NaN reaches torchao's observers first (AssertionError min <= max); it must end as
    the divergence error with the last good checkpoint kept, as under --qat none."""
    from qdefend.data import Normalization

    real_apply, calls = Normalization.apply, {"n": 0}

    def poisoned(self, x):
        out = real_apply(self, x)
        if len(x) != 64:  # validation batches
            return out
        calls["n"] += 1
        return out * np.float32("nan") if calls["n"] == 5 else out  # epoch 2, batch 1

    monkeypatch.setattr(Normalization, "apply", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"diverged at epoch 2.*epoch-0001 is kept"):
        Trainer(_tiny_cfg(qat), tmp_path / "r").fit()
    assert json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())["tag"] == "epoch-0001"


@pytest.mark.parametrize("qat", ["int8", "none"])
def test_non_finite_weight_after_a_step_stops_training(qat, tmp_path, monkeypatch):
    real_step, calls = torch.optim.SGD.step, {"n": 0}

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(NonFiniteLossError, match=r"weight became non-finite"):
        Trainer(_tiny_cfg(qat), tmp_path / "r").fit()
    parts, _, _ = load_checkpoint(tmp_path / "r" / "checkpoints", "latest")
    assert all(state_finite(k, v) for p in parts.values() for k, v in p.items())


def test_a_resume_with_a_lower_lr_continues_a_diverged_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--out", str(out), "--qat", "none", "--epochs", "1", *TINY, "--set", "train.lr=50"]) == 2
    assert main(["train", "--out", str(out), "--resume", "--set", "train.lr=0.05", "--quiet"]) == 0
    test = [r for r in RunPaths(out).read_metrics() if r["event"] == "test"]
    assert len(test) == 1


# ------------------------------------------------------------------------------ CIFAR pickles

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what an attacker plants: unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_malicious_cifar_pickle_is_refused_without_running(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    marker = tmp_path / "pwned"
    rows = np.zeros((2, 3072), np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        obj = {b"data": rows, b"labels": [0, 1]}
        if name == "data_batch_1":
            obj[b"batch_label"] = _Payload(marker)
        with open(d / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
    with pytest.raises(QdefendError, match=r"refusing to load .*data_batch_1: it asks to run io\.open"):
        load_dataset(DataConfig(name="cifar10", data_dir=str(d), val_size=1, aux_size=1))
    assert not marker.exists()
