"""Jacobian-based dataset augmentation (JBDA): grow a transfer set from a small seed set.

Papernot et al.'s black-box substitute training. Start from ``seed_size`` pool images labelled
by the service (top-1 labels). Each *substitution round* rho trains the substitute F on the set
S_rho (``substitute_epochs`` epochs, warm-started from the previous round), then synthesises one
new point per point of S_rho,

    x' = clip(x + lambda_rho * sign(d F_{O(x)}(x) / dx), 0, 1),   lambda_rho = step * (-1)^floor(rho / tau),

where O(x) is the service's label of x and F_{O(x)} the substitute's logit for it, and queries
the service for their labels: S_{rho+1} = S_rho u {x'}, so the set doubles per round. The last
round is cut to the remaining budget (a random subset of S_rho is augmented). ``tau`` = 0 keeps
lambda's sign fixed (the paper's first experiments); the periodic sign flip is its later
refinement. As for the other extraction attacks, the clone for each budget is then trained from
scratch on the first ``budget`` queries (seed set first, then each round in order).

Paper: Papernot, McDaniel, Goodfellow, Jha, Celik, Swami, "Practical Black-Box Attacks against
Machine Learning", AsiaCCS 2017 (arXiv 1602.02697).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..base import ATTACKS, check_positive
from .common import QUICK, Clone, ExtractionAttack, ExtractionConfig, clone_steps, train_clone

__all__ = ["JBDAConfig", "JBDAAttack", "jacobian_augment"]


@dataclass
class JBDAConfig(ExtractionConfig):
    """JBDA settings: the shared extraction settings plus the augmentation schedule."""

    attack_name: ClassVar[str] = "jbda"
    seed_size: int = 150  # pool images in the seed set (the paper: 150)
    step: float = 0.1  # lambda, in [0,1] pixel units (the paper: 0.1)
    tau: int = 3  # rounds between sign flips of lambda; 0 = never
    substitute_epochs: int = 10  # epochs per substitution round (the paper: 10)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "seed_size", integer=True)
        check_positive(self, "step")
        check_positive(self, "tau", integer=True, allow_zero=True)
        check_positive(self, "substitute_epochs", integer=True)


def jacobian_augment(substitute: Clone, x01: np.ndarray, labels: np.ndarray, step: float,
                     batch: int = 500) -> np.ndarray:
    """x + step * sign(d logit_label / dx), clipped to [0, 1] (the substitute in eval mode)."""
    substitute.eval()
    out = []
    for i in range(0, len(x01), batch):
        x = torch.from_numpy(np.ascontiguousarray(x01[i:i + batch])).requires_grad_(True)
        y = torch.from_numpy(np.asarray(labels[i:i + batch], np.int64))
        picked = substitute(x).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, x)
        out.append((x.detach() + step * grad.sign()).clamp_(0.0, 1.0).numpy())
    return np.concatenate(out) if out else np.zeros_like(x01)


class JBDAAttack(ExtractionAttack):
    """JBDA: substitute training on a Jacobian-augmented seed set, labels only."""

    name = "jbda"
    requires = frozenset({"labels"})
    config_cls = JBDAConfig
    presets = {"quick": {**QUICK, "seed_size": 50, "substitute_epochs": 3}}
    answer = "labels"

    def collect(self, oracle, pool, ctx):
        cfg = self.config
        n_seed = min(cfg.seed_size, oracle.budget, len(pool))
        oracle(pool.images(pool.next_indices(n_seed)))
        substitute = ctx.new_clone(seed_offset=1)
        rounds = []
        rho = 0
        while oracle.left > 0:
            xs, ys = oracle.transfer_set()
            steps = clone_steps(len(xs), cfg.substitute_epochs, cfg.batch_size, 0)
            train_clone(substitute, xs, ys, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, rng=ctx.rng)
            lam = cfg.step * (-1) ** (rho // cfg.tau) if cfg.tau else cfg.step
            m = min(len(xs), oracle.left)
            pick = np.sort(ctx.rng.choice(len(xs), m, replace=False)) if m < len(xs) else np.arange(m)
            new = jacobian_augment(substitute, xs[pick], ys[pick].argmax(1), lam)
            oracle(new)
            rounds.append({"round": rho, "lambda": lam, "set_before": int(len(xs)), "added": int(m)})
            ctx.say(f"jbda: round {rho}: lambda {lam:+.3f}, set {len(xs)} -> {oracle.used}")
            rho += 1
        return {"rounds": rounds, "seed_set": n_seed,
                "notes": [f"jbda: {n_seed} seed images from the pool, {oracle.used - n_seed} Jacobian-synthesised "
                          f"queries over {len(rounds)} rounds"]}


ATTACKS.register(help="Papernot's Jacobian-based dataset augmentation, substitute from labels only")(
    JBDAAttack)
