"""Config dataclasses: defaults, TOML round trip, overrides and clear errors."""

import pytest

from qdefend.config import RunConfig, apply_overrides
from qdefend.errors import QdefendError


def test_toml_round_trip_keeps_every_field(tmp_path):
    cfg = RunConfig()
    cfg.train.epochs = 3
    cfg.defense.stack = "noise"
    cfg.defense.params = {"noise": {"sigma": 0.25}}
    cfg.save(tmp_path / "config.toml")
    back = RunConfig.load(tmp_path / "config.toml")
    assert back == cfg
    assert back.train.epochs == 3 and back.defense.params["noise"]["sigma"] == 0.25


def test_overrides_parse_toml_values():
    d = apply_overrides({}, ["train.lr=0.01", "model.name=resnet20", "train.milestones=[1, 2]"])
    cfg = RunConfig.from_dict(d)
    assert cfg.train.lr == 0.01 and cfg.model.name == "resnet20" and cfg.train.milestones == [1, 2]


def test_int_is_accepted_for_float_fields():
    cfg = RunConfig.from_dict({"train": {"lr": 1}})
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


@pytest.mark.parametrize(
    "d, needle",
    [
        ({"train": {"lrr": 0.1}}, "Valid keys of [train]"),
        ({"train": {"epochs": 0}}, "--epochs"),
        ({"train": {"optimizer": "rmsprop"}}, "adam, sgd"),
        ({"train": {"epochs": "two"}}, "must be int"),
        ({"model": {"name": "vgg99"}}, "vgg11_bn"),
        ({"data": {"name": "svhn"}}, "fashion-mnist"),
    ],
)
def test_bad_config_says_what_to_write(d, needle):
    with pytest.raises(QdefendError, match=None) as e:
        RunConfig.from_dict(d)
    assert needle in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(QdefendError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
