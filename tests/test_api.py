"""The Python API and the stage rules behind it: a tiny real run through train -> export -> attack,
re-used where it must be, refused where the run directory holds something else."""

import json

import pytest

import qdefend.api as qd
from qdefend.errors import QdefendError
from qdefend.stages import config_difference, ensure_attacked, ensure_exported, ensure_trained

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {"aux_size": 300, "n_eval": 100}  # the quick decoder on the tiny run's 300 aux images
TINY = {
    "data": {"limit_train": 256, "limit_test": 300, "val_size": 200, "aux_size": 300},
    "model": {"width": 0.25, "head_width": 0.25},
    "train": {"epochs": 1, "batch_size": 64},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api") / "tiny"
    trained = qd.train(TINY, root)
    exported = qd.export(root, ["tflite"], verify_images=100)
    return trained, exported


def test_config_takes_dicts_files_and_overrides(tmp_path):
    cfg = qd.config(TINY, ["train.lr=0.01"])
    assert cfg.train.lr == 0.01 and cfg.data.limit_train == 256
    (tmp_path / "c.toml").write_text('[train]\nepochs = 3\n')
    assert qd.config(tmp_path / "c.toml").train.epochs == 3
    with pytest.raises(QdefendError, match="no such file"):
        qd.config(tmp_path / "missing.toml")
    with pytest.raises(QdefendError, match="must be a finite number"):
        qd.config(TINY, ["train.lr=nan"])


def test_train_and_export_return_typed_results(run):
    trained, exported = run
    assert trained.root.is_dir() and trained.config.train.epochs == 1
    assert 0.1 < trained.test["test_acc_int8"] <= 1.0  # 10 classes: above chance after one epoch
    art = exported.artifacts["encoder.int8.tflite"]
    assert art.is_file() and art.parent.name == "artifacts"
    assert exported.verification["status"] == "verified"


def test_attack_returns_the_saved_result(run):
    trained, _ = run
    res = qd.attack(trained.root, "decoder", preset="quick", params=QUICK)
    saved = json.loads(open(res.extra["path"]).read())
    assert saved["metrics"]["mse"] == pytest.approx(res.metrics["mse"]) and res.metrics["mse"] > 0
    again, path, reused = ensure_attacked(trained.root, "encoder.int8.tflite", "decoder", preset="quick", params=QUICK)
    assert reused and str(path) == res.extra["path"] and again.metrics["mse"] == res.metrics["mse"]
    _, _, reused = ensure_attacked(trained.root, "encoder.int8.tflite", "decoder", preset="quick", params=QUICK, seed=1)
    assert not reused  # another seed is another result


def test_finished_stages_are_reused(run):
    trained, exported = run
    said = []
    again = ensure_trained(trained.root, qd.config(TINY, ["train.num_threads=1"]), say=said.append)
    assert again.reused and again.test == trained.test  # a how-to-run key does not make another run
    m = ensure_exported(trained.root, ["encoder.int8.tflite"], say=said.append)
    assert m["artifacts"]["encoder.int8.tflite"]["sha256"] == exported.manifest["artifacts"]["encoder.int8.tflite"]["sha256"]
    assert [s.split(" (")[0] for s in said] == ["train: done already, skipped", "export: done already, skipped"]


def test_a_run_directory_with_other_settings_is_refused_not_overwritten(run):
    trained, _ = run
    before = (trained.root / "config.toml").read_text()
    with pytest.raises(QdefendError, match=r"train.epochs is 1 there, 3 here.*delete") as e:
        ensure_trained(trained.root, qd.config(TINY, ["train.epochs=3"]))
    assert "\n" not in str(e.value) and (trained.root / "config.toml").read_text() == before
    assert config_difference(trained.config, qd.config(TINY, ["model.width=0.5"])) == {"model.width": (0.25, 0.5)}


def test_a_tampered_artifact_is_exported_again(run, tmp_path):
    import shutil

    trained, exported = run
    root = tmp_path / "copy"
    shutil.copytree(trained.root, root)
    art = root / "artifacts" / "encoder.int8.tflite"
    data = art.read_bytes()
    art.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    from qdefend.edge.manifest import sha256_file

    assert sha256_file(art) != exported.manifest["artifacts"]["encoder.int8.tflite"]["sha256"]
    m = ensure_exported(root, ["encoder.int8.tflite"], verify_images=100)
    assert sha256_file(art) == m["artifacts"]["encoder.int8.tflite"]["sha256"]  # exported again: intact


def test_resume_through_the_api_applies_what_may_change(run, tmp_path):
    import shutil

    trained, _ = run
    root = tmp_path / "resume"
    shutil.copytree(trained.root, root)
    more = qd.train(None, root, resume=True, overrides=["train.lr=0.01"], resume_flags={"train.epochs": 2})
    assert more.changed == {"train.epochs": [1, 2], "train.lr": [0.05, 0.01]} and more.config.train.epochs == 2
    with pytest.raises(QdefendError, match="pass no config"):
        qd.train(TINY, root, resume=True)
