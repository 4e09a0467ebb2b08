"""Query-free inversion: a shadow encoder trained through the frozen cloud head, then rMLE on it.

The attacker holds the cloud head (it runs the cloud, or the head is public) and labelled
auxiliary images, but never queries the edge encoder. It trains a shadow encoder s so that
``head(release(s(x)))`` classifies its aux images (cross-entropy, head frozen): s must then
produce features the head reads like the victim's. Private images' intercepted features are
inverted by rMLE through s. Weaker than the query-based attacks (only the head ties s to the
victim's feature space), so it is the floor of what a cloud-side attacker gets without queries.

The shadow's layout is the run's encoder layout (``arch=victim``, public in any exported
artifact) or ``generic`` (see ``clone_rmle``); its output passes through the run's release
transform during training, so the head sees features distributed as in deployment.

Paper: He, Zhang, Lee, "Model Inversion Attacks against Collaborative Inference", ACSAC 2019
(query-free attack: shadow model through the cloud part, then rMLE).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from ..base import ATTACKS, Attack, AttackError, check_positive
from ..extraction.common import pool_stats
from .clone import SurrogateInversionConfig, _run_of, build_encoder_clone, invert_through

__all__ = ["ShadowConfig", "ShadowAttack"]


@dataclass
class ShadowConfig(SurrogateInversionConfig):
    attack_name: ClassVar[str] = "shadow"
    epochs: int = 10
    n_train: int = 0  # labelled aux images to train the shadow on; 0 = the whole aux split

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "n_train", integer=True, allow_zero=True)


@ATTACKS.register(help="query-free: shadow encoder trained through the frozen cloud head, rMLE on it")
class ShadowAttack(Attack):
    """Shadow encoder through the frozen head (aux labels, no encoder queries), then rMLE on the shadow."""

    name = "shadow"
    family = "inversion"
    requires = frozenset({"features"})
    config_cls = ShadowConfig
    presets = {"quick": {"epochs": 2, "n_train": 1000, "iterations": 100, "n_eval": 8, "oracle_epochs": 0}}

    def check(self, target):
        super().check(target)
        if target.head() is None:
            raise AttackError(f"attack 'shadow' needs the cloud head; target '{target.name}' has none: "
                              "use --attack decoder or clone_rmle instead")

    def _run(self, target, data, seed, say):
        cfg = self.config
        head = target.head()
        for p in head.parameters():
            p.requires_grad_(False)
        n = min(cfg.n_train or len(data.aux), len(data.aux))
        x_aux, y_aux = data.aux.floats(slice(0, n)), data.aux.labels[:n]
        mean, std = pool_stats(x_aux)
        run = _run_of(target) if cfg.arch == "victim" else None
        sigmoid = bool(run.cfg.model.sigmoid) if run is not None else True
        shadow = build_encoder_clone(cfg.arch, run, target.input_shape, target.feature_shape, mean, std, sigmoid, seed)
        g = torch.Generator().manual_seed(seed)
        xt, yt = torch.from_numpy(x_aux), torch.from_numpy(np.asarray(y_aux, np.int64))
        opt = torch.optim.Adam(shadow.parameters(), lr=cfg.lr)
        steps = cfg.epochs * math.ceil(len(xt) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
        t0 = time.perf_counter()
        shadow.train()
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(xt), generator=g)
            total, correct = 0.0, 0
            for i in range(0, len(xt), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                if len(idx) < 2:
                    continue
                logits = head(target.release_torch(shadow(xt[idx]), g))
                loss = F.cross_entropy(logits, yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                correct += int((logits.argmax(1) == yt[idx]).sum())
            say(f"shadow: epoch {epoch + 1}/{cfg.epochs}, head CE {total / len(xt):.4f}, aux acc {correct / len(xt):.3f}")
        shadow.eval()
        for p in shadow.parameters():
            p.requires_grad_(False)
        timings = {"shadow_train_s": round(time.perf_counter() - t0, 3)}

        x_test, recon, _, metrics, extra, timings["optimise_s"] = invert_through(shadow, target, data, cfg, seed, say,
                                                                                 "shadow")
        extra["notes"] = ["query-free: no encoder queries; the shadow encoder is tied to the victim only through "
                          "the frozen cloud head"]
        extra["queries"] = 0
        k = cfg.keep_images
        return self.result(target, seed, metrics, timings=timings, originals=x_test[:k],
                           reconstructions=recon[:k], extra=extra)
