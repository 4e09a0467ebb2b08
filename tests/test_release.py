"""The release-step table: every step type's numpy function (the device) against its torch twin
(training, attack targets), its declared noise std and randomness, and its manifest check."""

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from qdefend.edge.errors import ArtifactError
from qdefend.edge.release import (
    STEP_TYPES, apply_release, check_steps, noise_std, random_release, torch_release, wire_quant_params,
)

N, SHAPE = 400, (4, 6, 6)
D = math.prod(SHAPE)


def _z(seed=0):
    return np.random.default_rng(seed).random((N, *SHAPE), dtype=np.float32)


def _bank(k):
    return (np.random.default_rng(7).standard_normal((k, D)) * 0.3).round(4).tolist()


# One representative step per type, and whether the two implementations must agree bit for bit.
STEPS = {
    "gaussian_noise": {"type": "gaussian_noise", "sigma": 0.2},
    "laplace_noise": {"type": "laplace_noise", "scale": 0.1},
    "dropout": {"type": "dropout", "p": 0.3},
    "topk_prune": {"type": "topk_prune", "ratio": 0.4},
    "additive_noise": {"type": "additive_noise", "tensors": _bank(3)},
    "vib_sample": {"type": "vib_sample", "log_sigma": [math.log(0.05), math.log(0.3), -2.0, -1.0],
                   "mask": [1, 1, 0, 1]},
}


def test_every_step_type_has_a_representative_here():
    assert set(STEPS) == set(STEP_TYPES)


def _both(step, seed=0):
    z = _z(seed)
    out_np = apply_release(z, [step], np.random.default_rng(seed))
    out_t = torch_release(torch.from_numpy(z), [step], torch.Generator().manual_seed(seed)).numpy()
    return z, out_np, out_t


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_numpy_and_torch_release_the_same_distribution(kind):
    """Deterministic parts equal exactly, random parts match in their moments (the two RNGs differ)."""
    step = STEPS[kind]
    z, a, b = _both(step)
    assert a.shape == b.shape == z.shape and a.dtype == b.dtype == np.float32
    da, db = (a - z).ravel(), (b - z).ravel()
    if kind == "topk_prune":
        np.testing.assert_array_equal(a, b)
        assert (a.reshape(N, -1) == 0).sum(1).tolist() == [round(0.4 * D)] * N
    elif kind == "dropout":
        for out in (a, b):
            assert abs((out == 0).mean() - 0.3) < 0.01
            np.testing.assert_array_equal(out[out != 0], z[out != 0])  # kept elements unscaled
    elif kind == "additive_noise":
        bank = np.asarray(step["tensors"], np.float32)
        for out in (a, b):
            deltas = (out - z).reshape(N, 1, D)
            hits = (np.abs(deltas - bank[None]).max(-1) < 1e-5)
            assert (hits.sum(1) == 1).all() and len(set(hits.argmax(1).tolist())) == 3
    elif kind == "vib_sample":
        per_ch = np.asarray(step["mask"], np.float32)
        for out in (a, b):
            off = out[:, per_ch == 0]
            assert (off == 0).all()
            for c, (ls, m) in enumerate(zip(step["log_sigma"], step["mask"])):
                if m:
                    assert np.std(out[:, c] - z[:, c]) == pytest.approx(math.exp(ls), rel=0.05)
    else:  # additive noise of a known std, zero mean
        std = noise_std([step])
        for d in (da, db):
            assert np.std(d) == pytest.approx(std, rel=0.03) and abs(np.mean(d)) < 0.05 * std
        if kind == "laplace_noise":  # the shape of the law, not only its std: E|X| = b for Laplace(0, b)
            for d in (da, db):
                assert np.mean(np.abs(d)) == pytest.approx(step["scale"], rel=0.03)


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_declared_randomness_is_what_the_functions_do(kind):
    step = STEPS[kind]
    z = _z()
    again = [apply_release(z, [step], np.random.default_rng(s)) for s in (1, 2)]
    assert random_release([step]) == (not np.array_equal(*again))


@pytest.mark.parametrize("kind", sorted(STEPS))
def test_torch_twin_is_differentiable_in_z(kind):
    z = torch.from_numpy(_z()).requires_grad_(True)
    torch_release(z, [STEPS[kind]], torch.Generator().manual_seed(0)).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_zero_parameters_release_the_features_unchanged():
    z = _z()
    steps = [{"type": "gaussian_noise", "sigma": 0.0}, {"type": "laplace_noise", "scale": 0.0},
             {"type": "dropout", "p": 0.0}, {"type": "topk_prune", "ratio": 0.0}]
    np.testing.assert_array_equal(apply_release(z, steps, np.random.default_rng(0)), z)
    np.testing.assert_array_equal(torch_release(torch.from_numpy(z), steps).numpy(), z)
    assert not random_release(steps) and noise_std(steps) == 0


@pytest.mark.parametrize("step, key", [
    ({"type": "gaussian_noise", "sigma": -0.1}, "release.steps[0].sigma"),
    ({"type": "gaussian_noise", "sigma": float("nan")}, "release.steps[0].sigma"),
    ({"type": "dropout", "p": 1.5}, "release.steps[0].p"),
    ({"type": "topk_prune"}, "release.steps[0].ratio"),
    ({"type": "additive_noise", "tensors": [[0.1], [0.1, 0.2]]}, "release.steps[0].tensors"),
    ({"type": "vib_sample", "log_sigma": [0.0, 0.0], "mask": [1]}, "release.steps[0].mask"),
    ({"type": "blur", "radius": 1}, "release.steps[0].type"),
])
def test_bad_steps_are_refused_naming_the_manifest_key(step, key):
    with pytest.raises(ArtifactError, match=re.escape(f"manifest key '{key}'")):
        check_steps([step])


def test_wire_widens_by_the_steps_noise_and_shift():
    sig = wire_quant_params(None, [STEPS["gaussian_noise"]], [0.0, 1.0])
    lo, hi = (-128 - sig["zero_point"]) * sig["scale"], (127 - sig["zero_point"]) * sig["scale"]
    assert lo == pytest.approx(-0.8, abs=sig["scale"]) and hi == pytest.approx(1.8, abs=sig["scale"])
    add = wire_quant_params(None, [STEPS["additive_noise"]], [0.0, 1.0])
    bank = np.asarray(STEPS["additive_noise"]["tensors"])
    assert (127 - add["zero_point"]) * add["scale"] == pytest.approx(1 + bank.max(), abs=add["scale"])


def test_the_table_imports_neither_numpy_nor_torch():
    """The manifest (stdlib only) imports the table: it must stay importable without numpy."""
    code = "import sys, qdefend.edge.release, qdefend.edge.manifest; print('numpy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
