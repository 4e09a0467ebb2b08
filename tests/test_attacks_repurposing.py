"""Input-repurposing probe: its tasks and ratios on hand-built inputs (the full attack runs in
test_attacks.py::test_every_attack_runs_quick_and_writes_its_result)."""

import numpy as np
import pytest

from qdefend.attacks import AttackError
from qdefend.attacks.repurposing import RepurposeConfig, attribute_tasks, derive_tasks, suppression


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
    assert set(labels) == set(desc) == {"bright", "bright_in_class", "area_in_class"}
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
