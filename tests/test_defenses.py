"""Defense registry, composition and the Gaussian noise release transform."""

import pytest
import torch

from qdefend.config import DefenseConfig
from qdefend.defenses import DEFENSES, build_defense, parse_stack, resolved_params
from qdefend.errors import QdefendError


def test_noise_release_has_the_configured_sigma_and_is_seeded():
    stack = build_defense(DefenseConfig("noise", {"noise": {"sigma": 0.2}}))
    z = torch.full((200, 8, 7, 7), 0.5)
    out = stack.release(z, torch.Generator().manual_seed(1))
    assert abs(float((out - z).std()) - 0.2) < 0.005
    assert abs(float((out - z).mean())) < 0.005
    again = stack.release(z, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert stack.release_spec() == {"steps": [{"type": "gaussian_noise", "sigma": 0.2}]}


def test_none_and_zero_sigma_release_unchanged():
    z = torch.rand(4, 8, 7, 7)
    assert torch.equal(build_defense(DefenseConfig("none")).release(z), z)
    assert torch.equal(build_defense(DefenseConfig("noise", {"noise": {"sigma": 0.0}})).release(z), z)


def test_defaults_are_resolved():
    stack = build_defense(DefenseConfig("noise"))
    assert resolved_params(stack) == {"noise": {"sigma": 0.1}}


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (DefenseConfig("noize"), "Valid defenses: "),
        (DefenseConfig("noise", {"noise": {"sigma": -1.0}}), "sigma must be a finite number >= 0"),
        (DefenseConfig("noise", {"noise": {"sgima": 1.0}}), "Valid keys of [defense.params.noise]: sigma"),
        (DefenseConfig("none", {"noise": {"sigma": 1.0}}), "not in the stack"),
        (DefenseConfig("noise+noise"), "twice"),
    ],
)
def test_bad_defense_config_fails_at_construction(cfg, needle):
    with pytest.raises(QdefendError) as e:
        build_defense(cfg)
    assert needle in str(e.value)


def test_registry_lists_noise():
    assert {"none", "noise"} <= set(DEFENSES.names())
    assert parse_stack("none") == [] and parse_stack("noise") == ["noise"]
