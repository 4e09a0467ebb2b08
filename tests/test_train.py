"""Training loop: QAT run end to end on a small real subset, resume, NaN stop, corrupt checkpoints."""

import json

import pytest
import torch

from qdefend.checkpoint import load_checkpoint
from qdefend.config import RunConfig
from qdefend.errors import NonFiniteLossError, QdefendError
from qdefend.run import RunPaths, load_run
from qdefend.train import Trainer

TRAIN_N = 1024


def tiny_cfg(epochs=1, **train):
    return RunConfig.from_dict({
        "data": {"limit_train": TRAIN_N, "limit_test": 1000, "val_size": 500, "aux_size": 500},
        "model": {"width": 0.25, "head_width": 0.25},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, **train},
        "defense": {"stack": "noise", "params": {"noise": {"sigma": 0.05}}},
    })


def _records(run_dir, event):
    return [r for r in RunPaths(run_dir).read_metrics() if r["event"] == event]


def test_qat_run_learns_and_records_float_and_int8(tmp_path):
    rec = Trainer(tiny_cfg(epochs=2), tmp_path / "r").fit()
    epochs = _records(tmp_path / "r", "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert {"val_acc", "val_acc_int8", "train_loss", "lr"} <= set(r)
    # 1024 real Fashion-MNIST images, 2 epochs: far above the 10% of chance
    assert rec["test_acc_fakequant"] > 0.6
    assert rec["test_acc_int8"] > 0.6
    assert abs(rec["test_acc_int8"] - rec["test_acc_fakequant"]) < 0.03
    cfg = RunConfig.load(tmp_path / "r" / "config.toml")
    assert cfg.defense.params == {"noise": {"sigma": 0.05}} and cfg.quant.scheme == "int8"
    run = load_run(tmp_path / "r")
    assert run.defense.release_spec() == {"steps": [{"type": "gaussian_noise", "sigma": 0.05}]}


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    Trainer(tiny_cfg(epochs=2), straight).fit()

    interrupted = tmp_path / "interrupted"
    import qdefend.train as tr

    real_batches = tr.batches
    def dying_batches(split, bs, **kw):  # killed in the middle of the 2nd epoch
        for i, b in enumerate(real_batches(split, bs, **kw)):
            if kw.get("epoch") == 1 and i == 5:
                raise KeyboardInterrupt
            yield b
    monkeypatch.setattr(tr, "batches", dying_batches)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg(epochs=2), interrupted).fit()
    monkeypatch.setattr(tr, "batches", real_batches)
    assert [r["epoch"] for r in _records(interrupted, "epoch")] == [1]

    with pytest.raises(QdefendError, match="--resume"):
        Trainer(tiny_cfg(epochs=2), interrupted).fit()
    Trainer(RunConfig.load(interrupted / "config.toml"), interrupted).fit(resume=True)
    assert [r["epoch"] for r in _records(interrupted, "epoch")] == [1, 2]
    a, _, _ = load_checkpoint(straight / "checkpoints", "latest")
    b, _, _ = load_checkpoint(interrupted / "checkpoints", "latest")
    for part in ("encoder", "head"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    orig = torch.nn.functional.cross_entropy
    calls = {"n": 0}
    steps_per_epoch = TRAIN_N // 64

    def poisoned(*a, **k):
        calls["n"] += 1
        out = orig(*a, **k)
        return out * float("nan") if calls["n"] > steps_per_epoch + 3 else out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch-0001") as e:
        Trainer(tiny_cfg(epochs=2), tmp_path / "r").fit()
    assert "--resume" in str(e.value)
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())["tag"]
    assert latest == "epoch-0001"
    parts, _, _ = load_checkpoint(tmp_path / "r" / "checkpoints")
    assert all(torch.isfinite(v).all() for v in parts["encoder"].values() if v.is_floating_point())


@pytest.mark.parametrize("stack, params, best, select", [
    ("noise", {"noise": {"sigma": 0.05}}, "epoch-0001", "best_val"),
    # CEM acts from epoch 2: epoch 1's network (its best val) is the undefended one, never picked
    ("noise+cem", {"noise": {"sigma": 0.05}, "cem": {"lam": 8.0, "clusters": 2}}, "epoch-0003", "best_val"),
    # train.select=last ships the last epoch whatever its validation accuracy
    ("noise", {"noise": {"sigma": 0.05}}, "epoch-0003", "last"),
])
def test_best_checkpoint_is_picked_among_the_defended_epochs(tmp_path, monkeypatch, stack, params, best, select):
    vals = iter([0.9, 0.5, 0.6])
    real_epoch = Trainer._epoch

    def epoch_with_val(self, *a, **k):  # the real epoch, then a fixed validation accuracy
        rec = real_epoch(self, *a, **k)
        rec["val_acc"] = rec["val_acc_int8"] = next(vals)
        return rec

    monkeypatch.setattr(Trainer, "_epoch", epoch_with_val)
    cfg = tiny_cfg(epochs=3)
    cfg.data.limit_train = 256
    cfg.defense.stack, cfg.defense.params = stack, params
    cfg.train.select = select
    Trainer(cfg, tmp_path / "r", progress=False).fit()
    assert json.loads((tmp_path / "r" / "checkpoints" / "best.json").read_text())["tag"] == best
    assert _records(tmp_path / "r", "test")[0]["checkpoint"] == best


def test_corrupted_checkpoint_is_refused_on_resume(tmp_path):
    Trainer(tiny_cfg(epochs=1), tmp_path / "r").fit()
    f = next((tmp_path / "r" / "checkpoints").glob("epoch-0001/model.safetensors"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x55
    f.write_bytes(bytes(data))
    with pytest.raises(QdefendError, match="sha256 mismatch"):
        Trainer(RunConfig.load(tmp_path / "r" / "config.toml"), tmp_path / "r").fit(resume=True)


def test_float_run_then_qat_fine_tune_from_it(tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg.quant.scheme = "none"
    rec = Trainer(cfg, tmp_path / "float").fit()
    assert "test_acc_float" in rec and "test_acc_int8" not in rec
    q = tiny_cfg(epochs=1, lr=0.01)
    q.init_from = str(tmp_path / "float")
    rec_q = Trainer(q, tmp_path / "qat").fit()
    # fine-tuning starts from the float weights: at least as good as the float model, give or take
    assert rec_q["test_acc_int8"] > rec["test_acc_float"] - 0.05
