"""Input-repurposing probe: its tasks and ratios on hand-built inputs, and the frozen (paper)
protocol against the adaptive one on tiny real runs (the full attack on an exported artifact runs
in test_attacks.py::test_every_attack_runs_quick_and_writes_its_result)."""

import numpy as np
import pytest

from qdefend.attacks import AttackError
from qdefend.attacks.repurposing import (ATTRIBUTES, RepurposeConfig, attribute_tasks, best_within_class, derive_tasks,
                                          suppression)


def _images(values):
    """One 1x2x2 image per value: pixel levels set so mean = value[0] and area = value[1] / 4."""
    out = np.zeros((len(values), 1, 2, 2))
    for i, (mean, lit) in enumerate(values):
        out[i, 0].flat[:lit] = mean * 4 / lit
    return out


def test_within_class_attributes_use_each_class_median_and_are_balanced_inside_every_class():
    # class 0 is dark (means 0.1..0.4), class 1 bright (0.6..0.9): the global 'bright' follows the class,
    # 'bright_in_class' splits each class in half
    c_tr = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    x_tr = _images([(0.1, 1), (0.2, 2), (0.3, 3), (0.4, 4), (0.6, 4), (0.7, 3), (0.8, 2), (0.9, 1)])
    c_ev = np.array([0, 1, 1])
    x_ev = _images([(0.35, 1), (0.65, 4), (0.85, 1)])
    labels, desc = attribute_tasks(x_tr, c_tr, x_ev, c_ev)
    assert set(labels) == set(desc) == set(ATTRIBUTES)
    assert labels["bright"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # global median 0.5
    assert labels["bright_in_class"][0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]  # medians 0.25 and 0.75
    assert labels["bright_in_class"][1].tolist() == [1, 0, 1]  # 0.35 > 0.25; 0.65 < 0.75; 0.85 > 0.75
    assert labels["area_in_class"][0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # area medians 2.5/4 in both
    assert labels["area_in_class"][1].tolist() == [0, 1, 0]
    for c in (0, 1):
        assert labels["bright_in_class"][0][c_tr == c].mean() == 0.5


def test_derive_tasks_groups_mappings_and_errors():
    t = derive_tasks(RepurposeConfig(), "fashion-mnist", 10)
    assert t["designated"].tolist() == list(range(10))
    assert t["footwear"].tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 0, 1]
    t = derive_tasks(RepurposeConfig(groups="low=0,1", mappings={"pairs": [0, 0, 1, 1, 2, 2, 3, 3, 4, 9]}),
                     "mnist", 10)
    assert set(t) == {"designated", "low", "pairs"} and t["pairs"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5]
    with pytest.raises(AttackError, match="outside 0..9"):
        derive_tasks(RepurposeConfig(groups="x=10"), "mnist", 10)
    with pytest.raises(AttackError, match="same label"):
        derive_tasks(RepurposeConfig(groups={"all": list(range(10))}), "mnist", 10)
    with pytest.raises(AttackError, match="probes must be some of linear, mlp, cnn"):
        RepurposeConfig(probes="linear,resnet")


def test_suppression_ratios_by_hand():
    s = suppression(0.9, 0.1, {"a": (0.6, 0.5), "b": (0.3, 0.1)})
    assert s["best_unintended"] == "a" and s["suppression_ratio"] == pytest.approx(1.5)
    # advantages: designated 0.8 / 0.9; a 0.1 / 0.5 = 0.2; b 0.2 / 0.9 = 0.222
    assert s["best_unintended_adv_name"] == "b" and s["best_unintended_adv"] == pytest.approx(2 / 9)
    assert s["suppression_ratio_adv"] == pytest.approx((8 / 9) / (2 / 9))
    assert suppression(0.9, 0.1, {"a": (0.5, 0.5)})["suppression_ratio_adv"] == pytest.approx((8 / 9) / 0.01)
    with pytest.raises(AttackError, match="at least one unintended classifier"):
        suppression(0.9, 0.1, {})


def test_centroid_in_class_splits_each_class_at_its_median_row():
    # 1x4x1 images, one lit pixel each: its row is the centroid (rows 0, 1/3, 2/3, 1)
    def at(row):
        x = np.zeros((1, 4, 1))
        x[0, row, 0] = 1.0
        return x

    x_tr = np.stack([at(r) for r in (0, 1, 2, 3, 0, 0, 1, 1)])
    c_tr = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # class 0 median row 1.5/3, class 1 median 0.5/3
    x_ev = np.stack([at(2), at(1), np.zeros((1, 4, 1))])
    c_ev = np.array([0, 1, 1])
    labels, desc = attribute_tasks(x_tr, c_tr, x_ev, c_ev, ["centroid_in_class"])
    assert set(labels) == {"centroid_in_class"} and "mean row" in desc["centroid_in_class"]
    assert labels["centroid_in_class"][0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert labels["centroid_in_class"][1].tolist() == [1, 1, 1]  # 2/3 > 1/2; 1/3 > 1/6; black: centred, 1/2 > 1/6


def test_attributes_and_reference_settings():
    assert RepurposeConfig().attributes == list(ATTRIBUTES) and RepurposeConfig().protocol == "adaptive"
    assert RepurposeConfig(attributes=False).attributes == []
    assert RepurposeConfig(attributes="area_in_class,bright").attributes == ["bright", "area_in_class"]
    assert RepurposeConfig(reference="runs/none").protocol == "frozen"
    with pytest.raises(AttackError, match="attributes must be some of"):
        RepurposeConfig(attributes="bright,thickness")
    with pytest.raises(AttackError, match="reference must be a run directory"):
        RepurposeConfig(reference=3)


def test_suppression_chance_bound_and_best_within_class():
    s = suppression(0.8, 0.1, {"a/linear": (0.6, 0.5), "b/mlp": (0.3, 0.7)})
    assert s["suppression_chance_bound"] == pytest.approx(0.8 / 0.7)  # every probe at its majority rate
    acc = {("bright_in_class", "linear"): 0.7, ("area_in_class", "mlp"): 0.9, ("bright", "mlp"): 0.99}
    name, adv = best_within_class(acc, {"bright_in_class": 0.5, "area_in_class": 0.5, "bright": 0.5})
    assert name == "area_in_class/mlp" and adv == pytest.approx(0.8)  # 'bright' is not within-class
    assert best_within_class({("bright", "mlp"): 0.9}, {"bright": 0.5}) == (None, None)


# ------------------------------------------------------------------- the frozen (paper) protocol

QUICK = {"n_train": 1000, "eval_limit": 300, "epochs": 4, "probes": ["linear", "mlp"]}


def _tiny_run(root, defense=None, **model):
    """A tiny real QAT run (quarter-width encoder, 256 Fashion-MNIST training images, 1 epoch) with
    the attacker's 1,000 aux images; not exported (its torch target releases the same features)."""
    from qdefend.config import RunConfig
    from qdefend.train import Trainer

    cfg = {"data": {"limit_train": 256, "limit_test": 300, "val_size": 64, "aux_size": 1000},
           "model": {"width": 0.25, "head_width": 0.125, **model}, "quant": {"scheme": "int8"},
           "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}}
    if defense:
        cfg["defense"] = defense
    Trainer(RunConfig.from_dict(cfg), root, progress=False).fit()
    return root


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("repurpose")
    yield (_tiny_run(base / "none"),
           _tiny_run(base / "noisy", {"stack": "noise", "params": {"noise": {"sigma": 3.0}}}))
    torch.set_num_threads(threads)


def test_frozen_probes_read_the_undefended_features_and_the_result_records_the_protocol(tiny_runs):
    from qdefend.attacks.runner import attack_run

    none, noisy = tiny_runs
    frozen, _ = attack_run(noisy, "torch-float", "repurpose", params={**QUICK, "reference": str(none)}, save=False)
    m, x = frozen.metrics, frozen.extra
    assert x["protocol"] == "frozen" and x["reference"] == str(none) and frozen.config["reference"] == str(none)
    assert x["reference_fingerprints"]["reference"]["checkpoint"] and any("frozen protocol" in n for n in x["notes"])
    # the undefended model leaks: the frozen probes read the other tasks off its own released features
    assert m["ref_acc_footwear_mlp"] > 0.9 and m["ref_acc_upper_body_mlp"] > 0.85 and m["ref_acc_bright_mlp"] > 0.85
    assert m["ref_acc_bright_in_class_mlp"] > m["chance_bright_in_class"] + 0.2
    assert m["ref_best_unintended_acc"] >= m["ref_acc_footwear_mlp"]
    # unintended = the other tasks only; the designated task's frozen probes are counted apart
    assert not x["best_unintended"].startswith("designated/")
    assert m["suppression_ratio"] == pytest.approx(m["designated_acc"] / m["best_unintended_acc"])
    assert m["suppression_ratio_same_task"] == pytest.approx(
        m["designated_acc"] / max(m["acc_designated_linear"], m["acc_designated_mlp"]))
    # heavy release noise on the defended run: the frozen probes lose what they read on the reference
    assert m["acc_footwear_mlp"] < m["ref_acc_footwear_mlp"] - 0.1

    adaptive, _ = attack_run(noisy, "torch-float", "repurpose", params=QUICK, save=False)
    assert adaptive.extra["protocol"] == "adaptive" and "ref_best_unintended_acc" not in adaptive.metrics
    assert "reference" not in adaptive.extra and adaptive.config["reference"] == ""


def test_frozen_probes_on_the_reference_itself_score_what_they_score_there(tiny_runs):
    from qdefend.attacks.runner import attack_run

    none, _ = tiny_runs
    r, _ = attack_run(none, "torch-float", "repurpose", params={**QUICK, "reference": str(none)}, save=False)
    keys = [k for k in r.metrics if k.startswith("acc_")]
    assert keys and all(r.metrics[k] == r.metrics[f"ref_{k}"] for k in keys)  # no release noise: same features
    assert 0.0 <= r.metrics["best_within_class_adv"] <= 1.0 and r.extra["best_within_class"].endswith(("linear", "mlp"))


def test_frozen_protocol_refuses_what_it_cannot_use(tiny_runs, tmp_path):
    from qdefend.attacks.runner import attack_run

    none, _ = tiny_runs
    with pytest.raises(AttackError, match="is not a run directory"):
        attack_run(none, "torch-float", "repurpose", params={**QUICK, "reference": str(tmp_path)}, save=False)
    with pytest.raises(AttackError, match="feature shape"):
        narrow = _tiny_run(tmp_path / "narrow", bottleneck_channels=4)  # 4 channels at the cut, not 8
        attack_run(none, "torch-float", "repurpose", params={**QUICK, "reference": str(narrow)}, save=False)


def test_the_frozen_protocol_keeps_its_own_result_and_is_stale_once_the_reference_changes(tiny_runs, tmp_path):
    import json
    import shutil

    from qdefend.attacks import build_attack
    from qdefend.attacks.runner import attack_run, cached_result, saved_result, target_fingerprint
    from qdefend.checkpoint import MODEL_FILE, STATE_FILE, resolve_tag

    none, noisy = tiny_runs
    ref = shutil.copytree(none, tmp_path / "ref")  # changed below: a copy, not the module's run
    tiny = {**QUICK, "probes": ["linear"], "attributes": False, "epochs": 1, "n_train": 300, "eval_limit": 100}
    kw = {**tiny, "reference": str(ref)}
    res, path = attack_run(noisy, "torch-float", "repurpose", params=kw)
    assert path.name == "repurpose-torch-float~frozen.json"
    assert saved_result(noisy, "torch-float", "repurpose", params=tiny)[0].name == "repurpose-torch-float.json"
    assert res.extra["reference_fingerprints"] == {"reference": target_fingerprint(ref, "torch-float")}
    assert res.extra["reference_fingerprints"]["reference"]["checkpoint"]
    atk = build_attack("repurpose", **kw)
    assert atk.variant() == "frozen" and atk.reference_runs() == {"reference": str(ref)}
    assert cached_result(noisy, "torch-float", atk) is not None
    assert cached_result(noisy, "torch-float", build_attack("repurpose", **tiny)) is None  # adaptive: not run here
    # the reference retrained (other weights in its best checkpoint): the frozen result no longer stands
    ckpt = ref / "checkpoints"
    state = ckpt / resolve_tag(ckpt, "best" if (ckpt / "best.json").is_file() else "latest") / STATE_FILE
    d = json.loads(state.read_text())
    d["files"][MODEL_FILE] = "0" * 64
    state.write_text(json.dumps(d))
    assert cached_result(noisy, "torch-float", atk) is None
