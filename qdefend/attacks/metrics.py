"""How well a reconstruction matches the private image, and the floor every number is read against.

* :func:`image_metrics`: MSE, PSNR and SSIM on [0,1] images (SSIM from ``pytorch_msssim``: 11x11
  Gaussian window, sigma 1.5, K = (0.01, 0.03), data range 1; per image, then averaged). PSNR is
  averaged per image, with each image's MSE floored at 1e-10 (so identical images give 100 dB).
* :func:`mean_image_baseline`: the same metrics for an "attack" that answers every query with
  the mean training image. An inversion attack that does not beat it has learned nothing about
  the individual image; ``leak_ratio = baseline_mse / attack_mse`` says by how much it does.
* :func:`bootstrap_ci`: percentile bootstrap interval of a per-image mean.
* :func:`train_oracle` / :func:`classifier_accuracy_on`: does a reconstruction keep the class?
  The oracle is a small CNN trained on the *attacker's* pixels (the aux split), independent of
  the victim and its defense, so a defended model cannot game it. Its accuracy on the original
  test images is reported next to it as the ceiling.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

__all__ = [
    "image_metrics", "mean_image_baseline", "bootstrap_ci", "leak_summary",
    "train_oracle", "classifier_accuracy_on", "inversion_metrics", "convergence",
]

PSNR_MSE_FLOOR = 1e-10


def _as_torch(a):
    import torch

    t = torch.as_tensor(np.ascontiguousarray(a, np.float32))
    if t.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(t.shape)}")
    return t


def image_metrics(orig01: np.ndarray, recon01: np.ndarray, *, per_image: bool = False) -> dict:
    """{"mse", "psnr", "ssim"}: means over images (floats) or, with ``per_image``, float64 arrays."""
    import torch

    from qdefend.image_metrics import ssim01

    a, b = _as_torch(orig01), _as_torch(recon01)
    if a.shape != b.shape:
        raise ValueError(f"originals {tuple(a.shape)} and reconstructions {tuple(b.shape)} differ in shape")
    b = b.clamp(0, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1).double()
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(PSNR_MSE_FLOOR))
    with torch.no_grad():
        s = ssim01(a, b, per_image=True).double()  # SSIM is symmetric; the order as before
    out = {"mse": mse.numpy(), "psnr": psnr.numpy(), "ssim": s.numpy()}
    return out if per_image else {k: float(v.mean()) for k, v in out.items()}


def mean_image_baseline(train_images01: np.ndarray, test_images01: np.ndarray, *, per_image: bool = False) -> dict:
    """Metrics of answering every test image with the mean of ``train_images01``."""
    test = np.asarray(test_images01, np.float32)
    mean = np.asarray(train_images01, np.float64).mean(axis=0, keepdims=True).astype(np.float32)
    return image_metrics(test, np.broadcast_to(mean, test.shape), per_image=per_image)


def bootstrap_ci(values, n: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """(lo, hi) percentile-bootstrap confidence interval of the mean of ``values``."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def leak_summary(orig01: np.ndarray, recon01: np.ndarray, baseline_train01: np.ndarray, *,
                 seed: int = 0, ci: bool = True) -> tuple[dict[str, float], dict]:
    """The metrics an inversion result reports, and per-image values for the JSON ``extra``.

    metrics: mse, psnr, ssim (+ _lo/_hi 95% bootstrap bounds), baseline_mse/psnr/ssim of the
    mean training image, and leak_ratio = baseline_mse / mse (> 1: the attack beats the floor).
    """
    per = image_metrics(orig01, recon01, per_image=True)
    base = mean_image_baseline(baseline_train01, orig01)
    m: dict[str, float] = {k: float(v.mean()) for k, v in per.items()}
    if ci:
        for k, v in per.items():
            m[f"{k}_lo"], m[f"{k}_hi"] = bootstrap_ci(v, seed=seed)
    m.update({f"baseline_{k}": v for k, v in base.items()})
    m["leak_ratio"] = base["mse"] / max(m["mse"], PSNR_MSE_FLOOR)
    return m, {k: [round(float(x), 6) for x in v] for k, v in per.items()}


# ---------------------------------------------------------------------------------------- oracle

_ORACLES: dict[tuple, object] = {}


def train_oracle(images01: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int = 10,
                 seed: int = 0, batch_size: int = 128):
    """A small CNN (conv32-pool-conv64-pool-fc) trained on [0,1] pixels; cached per data and seed.

    Adam 1e-3; ~80% test accuracy on Fashion-MNIST from 5,000 aux images in 10 epochs."""
    import torch
    from torch import nn

    x = np.ascontiguousarray(images01, np.float32)
    y = np.asarray(labels, np.int64)
    key = (x.shape, hash(x[:: max(1, len(x) // 64)].tobytes()), hash(y.tobytes()), num_classes, epochs, seed)
    if key in _ORACLES:
        return _ORACLES[key]
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            nn.Conv2d(x.shape[1], 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    if len(_ORACLES) > 8:
        _ORACLES.clear()
    _ORACLES[key] = net
    return net


def classifier_accuracy_on(recon01: np.ndarray, labels: np.ndarray, classifier: Callable) -> float:
    """Top-1 accuracy of ``classifier`` ([0,1] images tensor -> logits) on ``recon01``."""
    import torch

    x = _as_torch(recon01).clamp(0, 1)
    with torch.no_grad():
        pred = torch.cat([classifier(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred.numpy() == np.asarray(labels)).mean())


def convergence(curve, tail: float = 0.2, tol: float = 0.02, min_epochs: int = 5) -> dict:
    """Did a training curve (held-out MSE per epoch, lower is better) converge?

    ``converged`` when the last ``tail`` share of the epochs improved the best value by less than
    ``tol`` (relative): best over the whole curve vs best before the tail. A curve shorter than
    ``min_epochs`` never counts as converged. Returns {"converged", "tail_gain"}."""
    c = [float(v) for v in curve]
    if len(c) < min_epochs or not all(math.isfinite(v) for v in c):
        return {"converged": False, "tail_gain": float("nan") if not c else 1.0}
    k = max(1, math.ceil(tail * len(c)))
    before = min(c[:-k])
    gain = (before - min(c)) / before if before > 0 else 0.0
    return {"converged": bool(gain < tol), "tail_gain": round(float(gain), 6)}


def inversion_metrics(data, idx: np.ndarray, recon01: np.ndarray, *, seed: int = 0, oracle_epochs: int = 10,
                      attacker_images: np.ndarray | None = None, attacker_labels: np.ndarray | None = None,
                      ) -> tuple[dict[str, float], dict]:
    """Everything an inversion attack reports for reconstructions of ``data.test`` rows ``idx``.

    The floor is the mean image of the attacker's own pixels (``attacker_images``; default the aux
    split); the oracle (``oracle_epochs`` > 0) is trained on the same pixels. Returns (metrics, extra)."""
    orig = data.test.floats(idx)
    if attacker_images is None:
        attacker_images, attacker_labels = data.aux.floats(), data.aux.labels
    metrics, per = leak_summary(orig, recon01, attacker_images, seed=seed)
    if oracle_epochs:
        oracle = train_oracle(attacker_images, attacker_labels, data.num_classes, epochs=oracle_epochs, seed=seed)
        labels = data.test.labels[idx]
        metrics["oracle_acc"] = classifier_accuracy_on(recon01, labels, oracle)
        metrics["oracle_acc_original"] = classifier_accuracy_on(orig, labels, oracle)
    extra = {"per_image": per, "test_indices": [int(i) for i in idx],
             "baseline": "mean image of the attacker's own images",
             "oracle": f"small CNN trained {oracle_epochs} epochs on the attacker's pixels" if oracle_epochs else None}
    return metrics, extra
