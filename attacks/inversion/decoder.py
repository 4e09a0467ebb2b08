"""Black-box decoder (inverse-network) inversion: learn g with g(release(f(x))) ~ x.

The attacker queries the target with its own auxiliary images (the aux split: disjoint from the
victim's train/val data and from the private test images), receives the *released* features -
noise, dropout and the int8 wire included, exactly what the cloud sees - and trains a decoder
with pixel MSE on (released features, image) pairs. The attacker is noise-aware: with a random
release transform it queries the aux set ``query_rounds`` times (fresh noise each time) and
cycles through the rounds epoch by epoch, as CEM's attacker draws fresh noise every batch. The
decoder then inverts the released features of private test images, and the result is compared
with the mean-image floor.

Decoder: conv3x3(C_z -> 4w)-BN-ReLU, then per factor-2 upsampling ConvTranspose(4x4,
stride 2)-BN-ReLU (optionally residual blocks after each), conv3x3 -> C and a sigmoid, so the
output is already [0,1] pixels; non-power-of-2 sizes are resized bilinearly before the last conv.

Paper: He, Zhang, Lee, "Model Inversion Attacks against Collaborative Inference", ACSAC 2019
(inverse network); Li et al., "ResSFL", CVPR 2022 and Xia et al., "CEM", CVPR 2025
(arXiv 2503.00383) for the decoder attacker (Adam 1e-3, cosine, batch 256, ~50 epochs).
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

from ..base import ATTACKS, Attack, check_positive
from ..metrics import inversion_metrics

__all__ = ["DecoderConfig", "DecoderAttack", "InverseNet", "eval_indices"]


@dataclass
class DecoderConfig:
    """Decoder attack settings. Defaults: SSIM ~0.66 on an undefended VGG11 split through its int8
    TFLite artifact, ~6 min on one CPU thread (30 epochs: SSIM 0.69 in 9 min); ``quick`` for tests."""

    attack_name: ClassVar[str] = "decoder"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    width: int = 32  # channels at full resolution; x2 per upsampling step
    res_blocks: int = 0  # residual blocks per resolution (0: plain decoder)
    n_train: int = 0  # aux images to train on; 0 = the whole aux split
    query_rounds: int = 4  # noisy queries of the aux set (used only if the release is random)
    n_eval: int = 500  # private test images to invert
    oracle_epochs: int = 10  # 0 skips the classifier-on-reconstructions metric
    keep_images: int = 64  # reconstructions kept for the PNG grid

    def __post_init__(self):
        for name in ("epochs", "batch_size", "width", "query_rounds", "n_eval"):
            check_positive(self, name, integer=True)
        for name in ("n_train", "oracle_epochs", "keep_images", "res_blocks"):
            check_positive(self, name, integer=True, allow_zero=True)
        check_positive(self, "lr")
        check_positive(self, "weight_decay", allow_zero=True)


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class InverseNet(nn.Module):
    """Features (C_z, h, w) -> [0,1] image (C, H, W): transposed convs matched to the shapes.

    ``res_blocks`` residual blocks follow the stem and each upsampling (0 = the plain decoder
    of He et al.; more capacity, ~3x the cost per block on CPU)."""

    def __init__(self, feature_shape, image_shape, width: int = 32, res_blocks: int = 0):
        super().__init__()
        cz, h = feature_shape[0], feature_shape[-1] if len(feature_shape) == 3 else 1
        c, H, W = image_shape
        self.flat = len(feature_shape) != 3  # a vector cut: start from a 4x4 map
        n_up = max(0, round(math.log2(max(H, W) / (h if not self.flat else 4))))
        ch = width * 2 ** n_up
        start = [nn.Linear(int(np.prod(feature_shape)), ch * 16), nn.Unflatten(1, (ch, 4, 4))] if self.flat else \
                [nn.Conv2d(cz, ch, 3, padding=1, bias=False)]
        layers = [*start, nn.BatchNorm2d(ch), nn.ReLU(), *(_Res(ch) for _ in range(res_blocks))]
        for _ in range(n_up):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ch // 2), nn.ReLU(), *(_Res(ch // 2) for _ in range(res_blocks))]
            ch //= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch, c, 3, padding=1)
        self.size = (H, W)

    def forward(self, z):
        h = self.body(z.flatten(1) if self.flat else z)
        if tuple(h.shape[-2:]) != self.size:
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(h))


def eval_indices(data, n: int) -> np.ndarray:
    """The first ``n`` private test images (test order is fixed; a prefix is a uniform sample of
    Fashion-MNIST's shuffled test set), the same for every attack and target."""
    return np.arange(min(n, len(data.test)))


def _random_release(target) -> bool:
    steps = target.release["steps"]
    return any(s.get("type") in ("gaussian_noise", "laplace_noise", "dropout") and
               any(float(v) > 0 for k, v in s.items() if k != "type") for s in steps) or \
        any(s.get("type") == "additive_noise" and len(s["tensors"]) > 1 for s in steps) or \
        any(s.get("type") == "vib_sample" and any(m > 0 for m in s["mask"]) for s in steps)


@ATTACKS.register("decoder", help="black-box inverse network trained on released aux features (noise-aware)")
class DecoderAttack(Attack):
    """Train an inverse network on (released features, image) pairs of the aux split; invert test images.

    Paper: He et al., "Model Inversion Attacks against Collaborative Inference", ACSAC 2019.
    """

    name = "decoder"
    family = "inversion"
    requires = frozenset({"features"})
    config_cls = DecoderConfig
    presets = {"quick": {"epochs": 3, "n_train": 1024, "batch_size": 64, "lr": 3e-3, "n_eval": 64, "query_rounds": 1,
                         "oracle_epochs": 0, "width": 16}}  # ~7 s on one thread; beats the floor ~4x

    def _run(self, target, data, seed, say):
        cfg = self.config
        timings = {}
        t0 = time.perf_counter()
        n_train = cfg.n_train or len(data.aux)
        x_aux = data.aux.floats(slice(0, n_train))
        rounds = cfg.query_rounds if _random_release(target) else 1
        say(f"decoder: querying {target.name} with {len(x_aux)} aux images x {rounds} round(s)")
        z_aux = [target.features(x_aux, release=True, seed=seed * 1000 + r + 1) for r in range(rounds)]
        timings["query_s"] = round(time.perf_counter() - t0, 3)

        t0 = time.perf_counter()
        net = train_decoder(z_aux, x_aux, target.feature_shape, target.input_shape, cfg, seed, say)
        timings["train_s"] = round(time.perf_counter() - t0, 3)

        t0 = time.perf_counter()
        idx = eval_indices(data, cfg.n_eval)
        x_test = data.test.floats(idx)
        z_test = target.features(x_test, release=True, seed=seed * 1000 + 999_983)
        recon = decode(net, z_test)
        metrics, extra = inversion_metrics(data, idx, recon, seed=seed, oracle_epochs=cfg.oracle_epochs)
        timings["eval_s"] = round(time.perf_counter() - t0, 3)
        extra.update({"query_rounds_used": rounds, "n_train": len(x_aux), "queries": len(x_aux) * rounds,
                      "decoder_params": sum(p.numel() for p in net.parameters())})
        k = cfg.keep_images
        return self.result(target, seed, metrics, timings=timings, originals=x_test[:k],
                           reconstructions=recon[:k], extra=extra)


def train_decoder(z_rounds: list[np.ndarray], x: np.ndarray, feature_shape, image_shape, cfg: DecoderConfig,
                  seed: int, say=lambda m: None) -> InverseNet:
    """Adam + per-step cosine schedule on pixel MSE; epoch e trains on query round e % rounds."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = InverseNet(feature_shape, image_shape, cfg.width, cfg.res_blocks)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    xt = torch.from_numpy(x)
    zs = [torch.from_numpy(z) for z in z_rounds]
    net.train()
    for epoch in range(cfg.epochs):
        z = zs[epoch % len(zs)]
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = F.mse_loss(net(z[idx]), xt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        say(f"decoder epoch {epoch + 1}/{cfg.epochs}: train mse {total / len(xt):.4f}")
    return net.eval()


def decode(net: InverseNet, z: np.ndarray, batch_size: int = 512) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([net(torch.from_numpy(z[i:i + batch_size])) for i in range(0, len(z), batch_size)]
                         ).numpy() if len(z) else np.zeros((0,), np.float32)
