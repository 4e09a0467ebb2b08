"""Checkpoints: safetensors round trip, optimizer state, atomic pointers, tamper detection."""

import json

import pytest
import torch

from qdefend.checkpoint import load_checkpoint, save_checkpoint
from qdefend.errors import QdefendError


def _parts_and_opt():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(8, 4)).sum().backward()
    opt.step()
    return m, opt


def test_round_trip_restores_weights_and_momentum(tmp_path):
    m, opt = _parts_and_opt()
    save_checkpoint(tmp_path, 1, {"encoder": m.state_dict()}, opt.state_dict(), {"step": 7})
    parts, opt_state, state = load_checkpoint(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(parts["encoder"][k], v)
    m2, _ = _parts_and_opt()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(opt_state)
    for p, q in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
    assert state["step"] == 7 and state["epoch"] == 1


def test_pointers_and_pruning(tmp_path):
    m, opt = _parts_and_opt()
    for e in range(1, 5):
        save_checkpoint(tmp_path, e, {"encoder": m.state_dict()}, None, {}, is_best=(e == 2), keep=2)
    assert json.loads((tmp_path / "latest.json").read_text())["tag"] == "epoch-0004"
    assert json.loads((tmp_path / "best.json").read_text())["tag"] == "epoch-0002"
    kept = sorted(p.name for p in tmp_path.glob("epoch-*"))
    assert kept == ["epoch-0002", "epoch-0003", "epoch-0004"]  # best is never pruned
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampered_checkpoint_is_refused(tmp_path, damage):
    m, opt = _parts_and_opt()
    d = save_checkpoint(tmp_path, 1, {"encoder": m.state_dict()}, opt.state_dict(), {})
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        f.unlink()
    with pytest.raises(QdefendError, match="corrupted or was modified"):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_says_train_first(tmp_path):
    with pytest.raises(QdefendError, match="qdefend train"):
        load_checkpoint(tmp_path)
