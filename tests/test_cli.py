"""CLI: listing registries, and user mistakes answered with one line (exit 2), no traceback."""

import subprocess
import sys

import pytest

from qdefend.cli import main


def test_list_commands(capsys):
    for what, name in (("datasets", "fashion-mnist"), ("models", "vgg11_bn"), ("defenses", "noise"), ("attacks", "decoder")):
        assert main(["list", what]) == 0
        assert name in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["list", "gizmos"], "Valid: datasets, models, defenses, attacks"),
        (["train", "--model", "vgg99", "--out", "{tmp}/r"], "Valid models:"),
        (["train", "--dataset", "svhn", "--out", "{tmp}/r"], "Valid datasets:"),
        (["train", "--defense", "noise+magic", "--out", "{tmp}/r"], "Valid defenses:"),
        (["train", "--dataset", "cifar10", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/r"], "cifar"),
        (["train", "--qat", "int4", "--out", "{tmp}/r"], "int8"),
        (["train", "--resume", "--out", "{tmp}/nothing"], "no config"),
        (["train", "--sigma", "-1", "--defense", "noise", "--out", "{tmp}/r"], "sigma must be a finite number >= 0"),
        (["train", "--device", "cuda", "--out", "{tmp}/r", "--set", "data.limit_train=64"], "--device cpu"),
        (["attack", "{tmp}/nothing", "--attack", "decoder"], "not a qdefend run"),
        (["attack", "{tmp}/nothing", "--attack", "invert-all"], "Valid attacks:"),
        (["attack", "{tmp}/nothing", "--attack", "decoder", "--set", "epochs"], "KEY=VALUE"),
        (["attack", "{tmp}/nothing", "--attack", "decoder", "--set", "epochs=-2"], "--set epochs="),
        (["compare", "{tmp}/nothing", "--attacks", "decoder,zap"], "Valid attacks:"),
        (["compare", "{tmp}/nothing"], "not a qdefend run"),
        (["compare", "{tmp}/nothing", "--preset", "decoder"], "ATTACK=PRESET"),
        (["compare", "{tmp}/nothing", "--preset", "decoder=huge"], "Valid presets: default, cem, fast, plain, quick"),
        (["compare", "{tmp}/a", "{tmp}/b", "--baseline", "{tmp}/c"], "is not one of the runs compared"),
        (["compare", "{tmp}/a", "--baseline", "{tmp}/a"], "needs a defended run to compare with it"),
        (["demo", "--defense", "nopeek+zap", "--out", "{tmp}/d"], "Valid defenses:"),
        (["demo", "--cut", "9", "--out", "{tmp}/d"], "--cut 9 is not a cut of vgg11_bn: use --cut 1..8"),
        (["attack", "{tmp}/nothing", "--attack", "decoder", "--set", "attacker.protocol=test_time"],
         "protocol must be one of infer_time, train_time"),
        (["attack", "{tmp}/nothing", "--attack", "gan", "--set", "decoder_preset=huge"], "decoder_preset must be one of"),
        (["attack", "{tmp}/nothing", "--attack", "decoder", "--set", "augment=flip", "--set", "views=3"],
         "augment=flip gives 2 views of an image"),
    ],
)
def test_user_mistakes_get_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err
    assert len(err.splitlines()) == 1


def test_console_script_prints_no_traceback(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "qdefend.cli", "train", "--model", "nope", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "Valid models:" in p.stderr
