"""GAN refinement of the decoder attack: a WGAN-GP critic sharpens the decoder's reconstructions.

The attacker first trains the black-box decoder (:mod:`.decoder`, its preset ``decoder_preset``,
on the same attacker images and protocol), then uses it as the generator G of a Wasserstein GAN
with gradient penalty, as CEM's ``train_gan.py`` does: a critic D (5x5 stride-2 convs at 64/128/256
channels, InstanceNorm and LeakyReLU(0.2), a final 4x4 conv) learns to tell the attacker's real
images from G's reconstructions of their released features, and G is trained on

    L_G = -D(G(z)) + mse_weight * MSE(G(z), x)        (mse_weight 1500)
    L_D = -(D(x) - D(G(z))) + gp_weight * GP           (gp_weight 10)

with ``n_critic`` (10) critic steps per generator step, Adam betas (0.5, 0.999), critic lr 5e-3,
generator lr 5e-4, cosine schedules (T_max 300 epochs), 150 epochs, batch 128, and fresh release
noise for every batch (noise-aware). The pixel term keeps G on the decoder's answer; the critic
pushes it toward the image manifold, so reconstructions get sharper edges at about the same MSE.
The final generator is the one scored (never picked by its MSE). The result reports its MSE next to
the MSE of the decoder it started from (``decoder_mse``, same private images) and the sharpness of
both (mean absolute neighbour difference, relative to the originals').

Paper: Xia et al., "CEM", CVPR 2025 (arXiv 2503.00383), train_gan.py; Gulrajani et al., "Improved
Training of Wasserstein GANs", NeurIPS 2017 (gradient penalty); Zhang et al., "The Secret Revealer:
Generative Model-Inversion Attacks", CVPR 2020 (the DGWGAN critic).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..attacker import ATTACKER_FIELDS, AttackerData, attacker_split
from ..base import ATTACKS, Attack, AttackError, check_positive
from ..metrics import convergence, inversion_metrics
from .decoder import DecoderAttack, _layout, decode, decoder_mse, fit_decoder, resolve_device

__all__ = ["GanConfig", "GanAttack", "Critic", "gradient_penalty", "sharpness", "train_gan"]


@dataclass
class GanConfig(AttackerData):
    """GAN refinement settings: CEM's train_gan.py schedule; ``quick`` for tests."""

    attack_name: ClassVar[str] = "gan"
    decoder_preset: str = "default"  # the decoder G starts from (a decoder preset: default, fast, plain, quick)
    epochs: int = 150
    batch_size: int = 128
    lr_g: float = 5e-4
    lr_d: float = 5e-3
    n_critic: int = 10  # critic steps per generator step
    gp_weight: float = 10.0
    mse_weight: float = 1500.0
    t_max: int = 300  # cosine period of both schedules, in epochs
    critic_width: int = 64
    device: str = "auto"
    oracle_epochs: int = 10
    keep_images: int = 64

    def __post_init__(self):
        self.check_data()
        if self.decoder_preset not in ("default", *DecoderAttack.presets):
            raise AttackError(f"gan.decoder_preset must be one of default, {', '.join(DecoderAttack.presets)}, "
                              f"got {self.decoder_preset!r}: e.g. --set decoder_preset=fast")
        for name in ("epochs", "batch_size", "n_critic", "t_max", "critic_width"):
            check_positive(self, name, integer=True)
        for name in ("oracle_epochs", "keep_images"):
            check_positive(self, name, integer=True, allow_zero=True)
        for name in ("lr_g", "lr_d"):
            check_positive(self, name)
        for name in ("gp_weight", "mse_weight"):
            check_positive(self, name, allow_zero=True)


class Critic(nn.Module):
    """``DGWGAN32``: conv5x5/2 (C -> w) + LeakyReLU, two conv5x5/2 + InstanceNorm + LeakyReLU
    (w -> 2w -> 4w), a final conv over the remaining map (4x4 for 28x28 and 32x32 inputs) -> score."""

    def __init__(self, image_shape, width: int = 64):
        super().__init__()
        c, h, w = image_shape

        def down(cin, cout, norm=True):
            return [nn.Conv2d(cin, cout, 5, 2, 2), *([nn.InstanceNorm2d(cout, affine=True)] if norm else []),
                    nn.LeakyReLU(0.2)]

        self.body = nn.Sequential(*down(c, width, False), *down(width, 2 * width), *down(2 * width, 4 * width))
        for _ in range(3):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.head = nn.Conv2d(4 * width, 1, (min(4, h), min(4, w)))

    def forward(self, x):
        return self.head(self.body(x)).flatten(1).mean(1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator=None) -> torch.Tensor:
    """WGAN-GP: mean of (||grad_x D(x_hat)||_2 - 1)^2 on random interpolates of real and fake."""
    alpha = torch.rand(len(real), 1, 1, 1, generator=generator).to(real.device)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def sharpness(images01: np.ndarray) -> float:
    """Mean absolute difference between horizontal and vertical neighbours: higher = sharper edges."""
    a = np.asarray(images01, np.float64)
    if a.ndim != 4 or not a.size:
        return float("nan")
    return float((np.abs(np.diff(a, axis=-1)).mean() + np.abs(np.diff(a, axis=-2)).mean()) / 2)


def train_gan(gen: nn.Module, z: np.ndarray, x: np.ndarray, cfg: GanConfig, seed: int, *, z_val=None, x_val=None,
              simulate=None, say=lambda m: None) -> tuple[nn.Module, dict]:
    """Refine generator ``gen`` (a trained decoder) against a WGAN-GP critic; returns the final
    generator (eval mode) and its record (held-out MSE per epoch, losses, ``converged``)."""
    device = resolve_device(cfg.device)
    gen = copy.deepcopy(gen)  # the decoder it starts from stays as it was
    g = torch.Generator().manual_seed(seed + 1)
    gen_noise = torch.Generator().manual_seed(seed + 104729)
    gen = gen.to(device).to(memory_format=torch.channels_last)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 2)
        critic = Critic(tuple(x.shape[1:]), cfg.critic_width).to(device).to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(critic.parameters(), lr=cfg.lr_d, betas=(0.5, 0.999))
    sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=cfg.t_max)
    sched_d = torch.optim.lr_scheduler.CosineAnnealingLR(opt_d, T_max=cfg.t_max)
    xt, zt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(z))
    has_val = z_val is not None and x_val is not None and len(x_val) > 0
    start = decoder_mse(gen, z_val, x_val) if has_val else float("nan")
    curve, d_losses, g_losses, step = [], [], [], 0
    for epoch in range(cfg.epochs):
        gen.train()
        critic.train()
        perm = torch.randperm(len(xt), generator=g)
        d_sum = g_sum = 0.0
        n_d = n_g = 0
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2:
                continue
            zb = zt[idx] if simulate is None else simulate(zt[idx], gen_noise)
            zb, real = _layout(zb, device), _layout(xt[idx], device)
            with torch.no_grad():
                fake = gen(zb)
            loss_d = -(critic(real).mean() - critic(fake).mean()) + cfg.gp_weight * gradient_penalty(critic, real, fake, g)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d_sum, n_d = d_sum + loss_d.item(), n_d + 1
            step += 1
            if step % cfg.n_critic == 0:
                fake = gen(zb)
                loss_g = -critic(fake).mean() + cfg.mse_weight * nn.functional.mse_loss(fake, real)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                g_sum, n_g = g_sum + loss_g.item(), n_g + 1
        sched_g.step()
        sched_d.step()
        d_losses.append(round(d_sum / max(n_d, 1), 6))
        g_losses.append(round(g_sum / n_g, 6) if n_g else None)
        score = decoder_mse(gen, z_val, x_val) if has_val else float("nan")
        curve.append(score)
        say(f"epoch {epoch + 1}/{cfg.epochs}: critic loss {d_losses[-1]:.4f}, generator loss "
            f"{g_losses[-1] if g_losses[-1] is not None else float('nan'):.4f}, held-out mse {score:.4f}")
    record = {"curve": [round(v, 6) for v in curve], "curve_of": "held-out attacker images (generator MSE)",
              "start_mse": round(start, 6), "critic_loss": d_losses, "generator_loss": g_losses,
              "generator_steps": step // cfg.n_critic, "epochs_run": len(curve), "device": str(device),
              **convergence([start, *curve])}
    return gen.eval(), record


@ATTACKS.register(help="GAN refinement: the trained decoder as generator against a WGAN-GP critic "
                              "(CEM train_gan.py; noise-aware)")
class GanAttack(Attack):
    """Decoder inversion refined with a WGAN-GP critic; inverts the private test images.

    Paper: Xia et al., "CEM", CVPR 2025 (train_gan.py); Gulrajani et al., NeurIPS 2017.
    """

    name = "gan"
    family = "inversion"
    requires = frozenset({"features"})
    config_cls = GanConfig
    presets = {
        # the CPU budget: 20 epochs (~130 generator steps on 9,000 images), the cosine annealed to 0
        # within them; at CEM's period (300 epochs for 150) the lr stays high to the end and left
        # the generator 4% above its decoder's MSE (benchmarks/attack_strength.py, gan-fast-t40)
        "fast": {"decoder_preset": "fast", "epochs": 20, "t_max": 20},
        "quick": {"decoder_preset": "quick", "epochs": 2, "protocol": "train_time", "aux_size": 512, "batch_size": 32, "n_critic": 2,
                  "n_eval": 32, "oracle_epochs": 0, "critic_width": 8, "t_max": 4},
    }

    def _run(self, target, data, seed, say):
        cfg = self.config
        data_fields = {k: getattr(cfg, k) for k in ATTACKER_FIELDS}
        dec_atk = DecoderAttack.from_preset(None if cfg.decoder_preset == "default" else cfg.decoder_preset,
                                            **data_fields, device=cfg.device, oracle_epochs=0)
        timings = {}
        t0 = time.perf_counter()
        split = attacker_split(data, cfg)
        say(f"gan: training the decoder it starts from ({cfg.decoder_preset} preset, {cfg.protocol}, "
            f"{split.describe['attacker_images']} attacker images)")
        net, feats, dec_record = fit_decoder(target, split, dec_atk.config, seed, say=lambda m: say(f"gan/decoder {m}"))
        dec_recon = decode(net, feats["z_eval"])
        timings["decoder_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        gen, record = train_gan(net, feats["z"], split.x_train, cfg, seed, z_val=feats["z_val"], x_val=split.x_holdout,
                                simulate=feats["simulate"], say=lambda m: say(f"gan {m}"))
        timings["gan_s"] = round(time.perf_counter() - t0, 3)
        recon = decode(gen, feats["z_eval"])
        metrics, extra = inversion_metrics(data, split.eval_idx, recon, seed=seed, oracle_epochs=cfg.oracle_epochs,
                                           attacker_images=split.pool, attacker_labels=split.pool_labels)
        dec_err = ((dec_recon - split.x_eval) ** 2).reshape(len(recon), -1).mean(1)
        ref = sharpness(split.x_eval)
        metrics.update({"decoder_mse": float(dec_err.mean()), "converged": float(record["converged"]),
                        "sharpness": sharpness(recon) / ref, "decoder_sharpness": sharpness(dec_recon) / ref})
        extra.update({"attacker": split.describe, "training": record, "decoder_training": dec_record,
                      "noise": feats["noise"], "queries": feats["queries"],
                      "sharpness_note": "mean absolute neighbour difference of the reconstructions / the originals'"})
        if not record["converged"]:
            extra.setdefault("notes", []).append(
                "the GAN's held-out MSE had not settled over the last 20% of epochs: a lower bound on the leak")
        k = cfg.keep_images
        return self.result(target, seed, metrics, timings=timings, originals=split.x_eval[:k],
                           reconstructions=recon[:k], extra=extra)
