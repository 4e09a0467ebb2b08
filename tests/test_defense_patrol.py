"""PATROL (ARL + Taylor channel pruning of the encoder): the units, the importance, the selection,
the masks through training, and an int8 export of a pruned encoder that verifies."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from qdefend import quant
from qdefend.config import DefenseConfig
from qdefend.defenses import DEFENSES, build_defense
from qdefend.defenses.patrol import Patrol, PatrolConfig, prunable_units, select_pruned, taylor_importance
from qdefend.errors import QdefendError
from qdefend.models import ModelConfig, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def qat_encoder(name="vgg11_bn", width=0.25):
    torch.manual_seed(0)
    net = build_model(ModelConfig(name=name, width=width, head_width=0.125), (1, 28, 28), 10)
    return quant.prepare_qat(net.encoder, torch.randn(2, 1, 28, 28)), net.head


@pytest.mark.parametrize("name,expected", [
    ("vgg11_bn", [("stage1.0.weight", "stage1.1"), ("stage2.0.weight", "stage2.1")]),
    ("resnet20", [("stem.0.weight", "stem.1")] + [(f"stage{k}.conv{i}.weight", f"stage{k}.bn{i}")
                                                   for k in (1, 2, 3) for i in (1, 2)]),
    ("mobilenet", [("stem.0.weight", "stem.1"), ("stage1.0.weight", "stage1.1"), ("stage1.3.weight", "stage1.4"),
                   ("stage2.0.weight", "stage2.1"), ("stage2.3.weight", "stage2.4")]),
])
def test_prunable_units_pair_each_conv_with_its_batchnorm(name, expected):
    enc, _ = qat_encoder(name)
    units = prunable_units(enc)
    assert [(u.conv, u.bn) for u in units] == expected  # the bottleneck at the cut is never a unit
    float_units = prunable_units(build_model(ModelConfig(name=name, width=0.25), (1, 28, 28), 10).encoder)
    assert [(u.conv, u.bn) for u in float_units] == expected  # the float module has the same names


def test_select_pruned_takes_the_lowest_normalised_channels_and_keeps_one_per_layer():
    imp = [torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([10.0, 10.0, 40.0])]
    # layer-normalised: [0.33, 0.67, 1, 2] and [0.5, 0.5, 2]; ratio 0.3 of 7 channels: 2 pruned
    keep = select_pruned(imp, 0.3)
    assert keep[0].tolist() == [False, True, True, True] and keep[1].tolist() == [False, True, True]
    assert all(k.all() for k in select_pruned(imp, 0.1))  # int(0.1 * 7) = 0
    keep = select_pruned([torch.tensor([1.0]), torch.tensor([1.0, 2.0, 3.0])], 0.9)  # 3 asked, one must stay per layer
    assert keep[0].tolist() == [True] and int(keep[1].sum()) == 1


def test_taylor_importance_is_zero_for_a_dead_filter(tmp_path):
    from qdefend.config import DataConfig
    from qdefend.data import load_dataset

    data = load_dataset(DataConfig(limit_train=256, limit_test=64, val_size=64, aux_size=64))
    enc, head = qat_encoder()
    enc.train()
    enc(torch.randn(8, 1, 28, 28))  # the observers see data once, as in training, before the epoch hook
    enc.eval()
    units = prunable_units(enc)
    with torch.no_grad():
        dict(enc.named_parameters())[units[1].conv][3] = 0
    imp = taylor_importance(enc, head, data, units, n_batches=2, batch_size=64)
    assert [len(i) for i in imp] == [u.channels for u in units]
    assert imp[1][3] == 0 and bool((imp[1] > 0).sum() >= units[1].channels - 2)
    assert not select_pruned(imp, 0.05)[1][3]  # the dead filter goes first


@pytest.mark.parametrize("qat", [False, True])
def test_masks_zero_a_channel_in_training_and_survive_momentum(qat):
    torch.manual_seed(0)
    net = build_model(ModelConfig(width=0.25, head_width=0.125), (1, 28, 28), 10)
    enc, head = (quant.prepare_qat(net.encoder, torch.randn(2, 1, 28, 28)) if qat else net.encoder), net.head
    d = Patrol(PatrolConfig(ratio=0.25))
    units = prunable_units(enc)
    keep = torch.ones(sum(u.channels for u in units), dtype=torch.uint8)
    keep[[2, 20]] = 0  # stage1 channel 2, stage2 channel 4
    d.masks.keep = keep
    d.apply(enc)
    d._hook(enc)
    opt = torch.optim.SGD(list(enc.parameters()) + list(head.parameters()), lr=0.5, momentum=0.9)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(3):  # without the pre-forward hook, momentum and BN's shift gradient would revive them
        enc.train()
        loss = F.cross_entropy(head(enc(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.train()
    enc(x)  # the hook zeroes what the last step moved
    params, bufs = dict(enc.named_parameters()), dict(enc.named_buffers())
    assert float(params["stage1.0.weight"][2].abs().max()) == 0 and float(params["stage2.0.weight"][4].abs().max()) == 0
    assert float(params["stage2.1.bias"][4]) == 0 and float(bufs["stage2.1.running_mean"][4]) == 0
    if not qat:  # the float module shows the channel's output itself: 0 in training and in evaluation
        feats = {}
        enc.stage2.register_forward_hook(lambda m, a, out: feats.__setitem__("s2", out))
        for mode in (True, False):
            enc.train(mode)
            enc(x)
            assert float(feats["s2"][:, 4].abs().max()) == 0.0 and float(feats["s2"][:, 3].abs().max()) > 0


def test_config_checks_and_registry():
    assert "patrol" in DEFENSES.names()
    d = build_defense(DefenseConfig("patrol", {"patrol": {"ratio": 0.1, "prune_epoch": 3, "warmup_epochs": 1}}))
    assert d.first_defended_epoch == 3 and d.defenses[0].config.alpha == 1.0
    for bad, key in [({"ratio": 1.0}, "defense.params.patrol.ratio"), ({"prune_epoch": 0}, "prune_epoch"),
                     ({"tau": 2}, "defense.params.patrol.tau")]:
        with pytest.raises(QdefendError, match=key):
            build_defense(DefenseConfig("patrol", {"patrol": bad}))


@pytest.mark.slow
def test_pruned_qat_run_exports_int8_that_verifies(tmp_path):
    """A tiny QAT run with patrol: pruned at the end of epoch 1, the checkpoint and the int8
    export hold exact zeros there, and the exported encoder verifies against torch."""
    from qdefend.config import RunConfig
    from qdefend.export import export_run
    from qdefend.run import load_run
    from qdefend.train import Trainer

    cfg = {"data": {"limit_train": 512, "limit_test": 128, "val_size": 128, "aux_size": 128},
           "model": {"width": 0.25, "head_width": 0.125}, "quant": {"scheme": "int8"},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
           "defense": {"stack": "patrol", "params": {"patrol": {"ratio": 0.2, "prune_epoch": 1, "taylor_batches": 2,
                                                                "steps": 1}}}}
    root = tmp_path / "patrol"
    Trainer(RunConfig.from_dict(cfg), root, progress=False).fit()
    recs = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["hook_patrol/pruned_channels"] for r in recs if r["event"] == "epoch"] == [9.0, 9.0]  # 0.2 of 48
    assert recs[-1]["checkpoint"] == "epoch-0002"
    manifest = export_run(root, verify_images=64)
    ver = manifest["verification"]
    assert ver["status"] == "verified"
    for name in ("encoder.int8.onnx", "encoder.int8.tflite"):
        assert ver["artifacts"][name]["top1_agreement"] >= 0.99
        assert ver["artifacts"][name]["parity"]["frac_values_within_1_pre_activation_lsb"] == 1.0
    run = load_run(root, "best")
    d = run.defense.defenses[0]
    assert int((d.masks.keep == 0).sum()) == 9
    dead = [(u, ~keep) for u, keep in d.keep_masks(run.net.encoder)]
    params = dict(run.net.encoder.named_parameters())
    for u, drop in dead:
        assert float(params[u.conv].detach()[drop].abs().sum()) == 0.0
    # the converted int8 encoder holds int8 zeros in the pruned filters (bias 0 too: output exactly 0)
    conv = run.converted_encoder()
    int8 = [functools.reduce(getattr, n.target.split("."), conv) for n in conv.graph.nodes if n.op == "get_attr"]
    int8 = [t for t in int8 if isinstance(t, torch.Tensor) and t.dtype == torch.int8 and t.dim() == 4]
    for u, drop in dead:
        w = [t for t in int8 if tuple(t.shape) == tuple(params[u.conv].shape)]
        assert len(w) == 1 and int(w[0][drop].abs().sum()) == 0 and int(w[0][~drop].abs().sum()) > 0
