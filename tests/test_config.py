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
        ({"train": {"optimizer": "rmsprop"}}, "must be one of sgd, adam"),
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


def test_one_key_value_parser_types_values_and_names_the_flag():
    from qdefend.config import parse_assignment

    assert parse_assignment("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_assignment(" milestones = [10, 20] ") == ("milestones", [10, 20])
    assert parse_assignment("budgets=1000,5000", "--set") == ("budgets", "1000,5000")  # not TOML: the bare string
    assert parse_assignment("flag=true") == ("flag", True)
    for bad in ("epochs", "=3", "epochs="):
        with pytest.raises(QdefendError, match=r"--preset expects ATTACK=PRESET, got .*: e.g. --preset decoder=fast"):
            parse_assignment(bad, "--preset", "decoder=fast", "ATTACK=PRESET")


def test_registries_take_the_name_from_the_class_and_refuse_a_contradiction():
    from qdefend.attacks import ATTACKS
    from qdefend.defenses import DEFENSES
    from qdefend.registry import Registry

    assert all(DEFENSES.get(n).name == n for n in DEFENSES.names())
    assert all(ATTACKS.get(n).name == n for n in ATTACKS.names())
    reg = Registry("widget")

    class Knob:
        name = "knob"

    assert reg.register()(Knob) is Knob and reg.get("knob") is Knob
    with pytest.raises(ValueError, match="named 'knob' but registered as 'dial'"):
        reg.register("dial")(Knob)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register()(Knob)


def test_the_validation_helpers_name_the_key_the_rule_the_value_and_the_fix():
    from qdefend.checks import check_choice, check_number

    assert check_number(3.0, "a.n", lo=1, integer=True) == 3 and isinstance(check_number(3.0, "a.n", integer=True), int)
    assert check_number(0.5, "a.p", lo=0, hi=1, hi_open=True) == 0.5
    cases = [
        (dict(v=-1, lo=0), "a.x must be a finite number >= 0, got -1: e.g. --set a.x=2"),
        (dict(v=0, lo=0, lo_open=True), "a.x must be a finite number > 0, got 0: e.g. --set a.x=2"),
        (dict(v=1.0, lo=0, hi=1, hi_open=True), "a.x must be a finite number in [0, 1), got 1.0: e.g. --set a.x=2"),
        (dict(v=float("nan"), lo=0), "a.x must be a finite number >= 0, got nan"),
        (dict(v=True, lo=0), "got True"),  # a bool is not a number
        (dict(v=2.5, lo=1, integer=True), "a.x must be an integer >= 1, got 2.5"),
    ]
    for kw, needle in cases:
        v = kw.pop("v")
        with pytest.raises(QdefendError) as e:
            check_number(v, "a.x", example=2, **kw)
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(QdefendError, match=r"^a.x must be a finite number >= 1, got 0: e.g. --epochs 2$"):
        check_number(0, "a.x", lo=1, fix="--epochs 2")
    with pytest.raises(QdefendError, match=r"^a.m must be one of sgd, adam, got 'rms': e.g. --set a.m=sgd$"):
        check_choice("rms", "a.m", ("sgd", "adam"))
