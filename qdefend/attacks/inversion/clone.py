"""Extract then invert: clone the encoder from queries, then run rMLE on the clone.

An int8 artifact (or any black-box encoder) gives no gradients, so white-box rMLE cannot run on
it. The attacker instead sends its own auxiliary images to the encoder (``budget`` queries: the
aux split, re-used with random shifts/flips past its size), reads the *released* features (int8
wire, noise and all) and trains a float clone f' with feature MSE, ||f'(x) - z||^2. rMLE
(:func:`~qdefend.attacks.inversion.rmle.rmle_invert`, same priors as ``rmle``) then inverts the
intercepted features of private test images through f'. With a random release the clone learns
the expected features, which is what rMLE's feature-matching term wants.

Clone architecture (``arch``): ``victim`` (default) builds the encoder layout of the run, in float
with fresh weights: an exported artifact carries its graph, so its architecture is public even
where the weights are not (Kerckhoffs). ``generic`` is a plain conv net that only knows the
feature shape (conv3x3-BN-ReLU blocks, a stride-2 block per halving, a 3x3 conv to the feature
channels), for when even the layout is unknown. The clone's output gets a sigmoid when every
released feature lies in [0, 1] (the attacker sees the range).

Papers: He, Zhang, Lee, ACSAC 2019 (rMLE; black-box via an inverse network); the
extraction step follows the KnockoffNets idea of learning a model from its answers (Orekondy et
al., CVPR 2019), here with the encoder's features as the answers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..base import ATTACKS, Attack, AttackError, check_choice, check_positive
from ..extraction.common import Clone, augment, pool_stats
from ..metrics import inversion_metrics
from .decoder import eval_indices
from .rmle import rmle_invert

__all__ = ["SurrogateInversionConfig", "CloneRMLEConfig", "CloneRMLEAttack", "invert_through", "build_encoder_clone", "train_encoder_clone", "collect_features"]

ARCHS = ("victim", "generic")


@dataclass
class SurrogateInversionConfig:
    """What ``clone_rmle`` and ``shadow`` share: a surrogate encoder trained by the attacker, then
    rMLE (the ``rmle`` attack's optimiser and priors) through it on private test images."""

    attack_name: ClassVar[str] = "surrogate"
    arch: str = "victim"  # victim (the public layout, fresh weights) | generic
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    iterations: int = 400  # rMLE steps (feature error flat after ~400 Adam steps at lr 0.05)
    rmle_lr: float = 0.05
    l_tv: float = 0.05
    l_2: float = 0.0
    n_eval: int = 64
    oracle_epochs: int = 10
    keep_images: int = 64

    def __post_init__(self):
        for name in ("epochs", "batch_size", "iterations", "n_eval"):
            check_positive(self, name, integer=True)
        for name in ("oracle_epochs", "keep_images"):
            check_positive(self, name, integer=True, allow_zero=True)
        for name in ("lr", "rmle_lr"):
            check_positive(self, name)
        for name in ("l_tv", "l_2"):
            check_positive(self, name, allow_zero=True)
        check_choice(self, "arch", ARCHS)


@dataclass
class CloneRMLEConfig(SurrogateInversionConfig):
    attack_name: ClassVar[str] = "clone_rmle"
    budget: int = 5000  # encoder queries (aux images; past the aux size: augmented re-uses)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "budget", integer=True)


def invert_through(surrogate, target, data, cfg: SurrogateInversionConfig, seed: int, say, what: str):
    """rMLE through ``surrogate`` on the released features of the private test images, scored.

    Returns (x_test, reconstructions, z_test, metrics, extra, seconds spent optimising)."""
    idx = eval_indices(data, cfg.n_eval)
    x_test = data.test.floats(idx)
    z_test = target.features(x_test, release=True, seed=seed * 1000 + 999_983)
    t0 = time.perf_counter()
    recon, info = rmle_invert(surrogate, z_test, target.input_shape, iterations=cfg.iterations, lr=cfg.rmle_lr,
                              l_tv=cfg.l_tv, l_2=cfg.l_2, batch_size=64, say=say, what=what)
    seconds = round(time.perf_counter() - t0, 3)
    metrics, extra = inversion_metrics(data, idx, recon, seed=seed, oracle_epochs=cfg.oracle_epochs)
    metrics["feature_mse"] = info["feature_mse"]
    return x_test, recon, z_test, metrics, extra, seconds


class _Generic(nn.Module):
    def __init__(self, in_ch: int, hw: tuple[int, int], feature_shape: tuple[int, ...], width: int = 64):
        super().__init__()
        cz, h = feature_shape[0], feature_shape[1]
        n_down = max(0, round(math.log2(hw[0] / h)))
        layers, c = [nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()], width
        for _ in range(n_down):
            layers += [nn.Conv2d(c, c * 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c * 2), nn.ReLU()]
            c *= 2
        layers += [nn.Conv2d(c, cz, 3, padding=1)]
        self.body = nn.Sequential(*layers)
        self.size = tuple(feature_shape[1:])

    def forward(self, x):
        z = self.body(x)
        return z if tuple(z.shape[-2:]) == self.size else F.adaptive_avg_pool2d(z, self.size)


def build_encoder_clone(arch: str, run, image_shape, feature_shape, mean, std, sigmoid: bool, seed: int) -> Clone:
    """A float encoder clone with fresh weights (``victim``: the run's layout minus its final sigmoid)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if arch == "victim":
            if run is None:
                raise AttackError("clone_rmle arch=victim needs the run's model config: attack an artifact of a "
                                  "run, or --set arch=generic")
            from qdefend.models import build_model

            enc = build_model(run.cfg.model, tuple(image_shape), run.data.num_classes).encoder
            if isinstance(enc[-1], nn.Sigmoid):  # the clone adds its own output range
                enc = enc[:-1]
            body = enc
        else:
            body = _Generic(image_shape[0], tuple(image_shape[1:]), tuple(feature_shape))
        return Clone(nn.Sequential(body, nn.Sigmoid()) if sigmoid else body, mean, std, arch)


def collect_features(target, pool_x: np.ndarray, budget: int, rng: np.random.Generator, seed: int, *,
                     flip: bool, shift: int = 2, say=lambda m: None) -> tuple[np.ndarray, np.ndarray]:
    """``budget`` (image, released feature) pairs: the pool in order, then augmented re-uses."""
    xs, zs, done, r = [], [], 0, 0
    while done < budget:
        n = min(budget - done, len(pool_x))
        x = pool_x[:n] if r == 0 else augment(pool_x[rng.permutation(len(pool_x))[:n]], rng, shift=shift, flip=flip)
        zs.append(target.features(x, release=True, seed=seed * 1000 + 17 + r))
        xs.append(x)
        done += n
        r += 1
        say(f"clone_rmle: {done}/{budget} encoder queries")
    return np.concatenate(xs), np.concatenate(zs)


def train_encoder_clone(clone: Clone, x: np.ndarray, z: np.ndarray, *, epochs: int, batch_size: int, lr: float,
                        seed: int, say=lambda m: None) -> Clone:
    g = torch.Generator().manual_seed(seed)
    xt, zt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.ascontiguousarray(z, np.float32))
    opt = torch.optim.Adam(clone.parameters(), lr=lr)
    steps = epochs * math.ceil(len(xt) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    clone.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue
            loss = F.mse_loss(clone(xt[idx]), zt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        say(f"clone_rmle: clone epoch {epoch + 1}/{epochs}, feature mse {total / len(xt):.5f}")
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _run_of(target):
    run = getattr(target, "run", None)
    if run is None and hasattr(target, "_loaded_run"):
        run = target._loaded_run()
    return run


@ATTACKS.register(help="extract then invert: clone the encoder from feature queries, rMLE on the clone")
class CloneRMLEAttack(Attack):
    """Clone the encoder from (aux image, released features) queries; invert private features via the clone."""

    name = "clone_rmle"
    family = "inversion"
    requires = frozenset({"features"})
    config_cls = CloneRMLEConfig
    presets = {"quick": {"budget": 1000, "epochs": 3, "iterations": 100, "n_eval": 8, "oracle_epochs": 0}}

    def _run(self, target, data, seed, say):
        cfg = self.config
        rng = np.random.default_rng(seed)
        pool_x = data.aux.floats()
        t0 = time.perf_counter()
        x_q, z_q = collect_features(target, pool_x, cfg.budget, rng, seed, flip=data.name != "mnist", say=say)
        timings = {"query_s": round(time.perf_counter() - t0, 3)}
        sigmoid = bool(z_q.min() >= 0 and z_q.max() <= 1)
        mean, std = pool_stats(pool_x)
        clone = build_encoder_clone(cfg.arch, _run_of(target) if cfg.arch == "victim" else None, target.input_shape,
                                    target.feature_shape, mean, std, sigmoid, seed)
        t0 = time.perf_counter()
        train_encoder_clone(clone, x_q, z_q, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, say=say)
        timings["clone_train_s"] = round(time.perf_counter() - t0, 3)

        x_test, recon, z_test, metrics, extra, timings["optimise_s"] = invert_through(
            clone, target, data, cfg, seed, say, "clone_rmle")
        with torch.no_grad():  # how well the clone predicts the private images' features
            zc = clone(torch.from_numpy(x_test)).numpy()
        clone_feature_mse = float(((zc - z_test) ** 2).mean())
        clone_feature_r2 = float(1 - ((zc - z_test) ** 2).sum() / max(((z_test - z_test.mean(0)) ** 2).sum(), 1e-12))
        metrics.update({"clone_feature_mse": clone_feature_mse,
                        "clone_feature_r2": clone_feature_r2, "queries": float(len(x_q))})
        extra.update({"clone": {"arch": cfg.arch, "sigmoid_output": sigmoid,
                                "params": int(sum(p.numel() for p in clone.parameters()))},
                      "notes": [f"gradients from a {cfg.arch}-layout clone trained on {len(x_q)} encoder queries "
                                f"(clone R^2 on private features {clone_feature_r2:.3f})"]})
        k = cfg.keep_images
        return self.result(target, seed, metrics, timings=timings, originals=x_test[:k],
                           reconstructions=recon[:k], extra=extra)
