"""KnockoffNets: steal a classifier's function from its output probabilities.

The attacker queries the service with a *transfer set* of its own images (``pool``: by default the
aux split of the victim's distribution; ``pool=mnist5k`` an out-of-distribution set, as the paper's
other-data-set transfer sets), keeps the probability vector of every answer and trains a clone to
match them (soft cross-entropy). Two policies pick the queries:

* ``random``: pool images in random order (each once before any twice; see ``common``).
* ``adaptive``: a gradient bandit over *actions* = the classes of the attacker's own pool
  labels (the paper's actions are the attacker's data-set classes). Per step: sample a class
  from softmax(H), take the next pool image of that class, query it, and reward the class with
  the mean of the chosen reward terms, each z-normalised with its running mean and variance:
  certainty (victim's top-1 minus top-2 probability), diversity (sum_k max(0, y_k - mean of the
  last ``diversity_window`` answers)), loss (soft cross-entropy of the online clone against the
  answer, measured *before* the clone trains on it). Update (Sutton & Barto 2.8):
  H_a += alpha (r - rbar)(1 - pi_a), H_a' -= alpha (r - rbar) pi_a' for the other arms, with
  alpha = 1 / (pulls of a) unless ``bandit_lr`` > 0. Queries go out ``bandit_batch`` at a time;
  the online clone takes one Adam step per batch on the new answers plus as many replayed ones.
  After collection, the clone for each budget is trained from scratch on the transfer set
  prefix, exactly as for the random policy.

Needs probabilities; against a labels-only service use ``copycat`` or ``jbda``.

Paper: Orekondy, Schiele, Fritz, "Knockoff Nets: Stealing Functionality of Black-Box Models",
CVPR 2019 (arXiv 1812.02766).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..base import ATTACKS, check_choice, check_positive
from .common import QUICK, CloneTrainer, ExtractionAttack, ExtractionConfig, query_random

__all__ = ["KnockoffConfig", "KnockoffAttack", "ClassBandit", "Rewards"]

REWARDS = ("all", "cert", "div", "loss")


@dataclass
class KnockoffConfig(ExtractionConfig):
    """KnockoffNets settings: the shared extraction settings plus the sampling policy."""

    attack_name: ClassVar[str] = "knockoff"
    policy: str = "random"  # random | adaptive
    reward: str = "all"  # adaptive: all | cert | div | loss
    bandit_batch: int = 20  # adaptive: queries per bandit round
    bandit_lr: float = 0.0  # adaptive: constant step alpha; 0 = 1 / pulls of the arm
    diversity_window: int = 25  # adaptive: Delta, answers averaged by the diversity reward

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "policy", ("random", "adaptive"))
        check_choice(self, "reward", REWARDS)
        check_positive(self, "bandit_batch", integer=True)
        check_positive(self, "diversity_window", integer=True)
        check_positive(self, "bandit_lr", allow_zero=True)


class ClassBandit:
    """Gradient bandit over ``n`` actions with a running-mean reward baseline."""

    def __init__(self, n: int, rng: np.random.Generator, lr: float = 0.0):
        self.h = np.zeros(n)
        self.pulls = np.zeros(n, np.int64)
        self.rng, self.lr = rng, lr
        self.baseline, self.t = 0.0, 0

    def probs(self) -> np.ndarray:
        e = np.exp(self.h - self.h.max())
        return e / e.sum()

    def sample(self, m: int) -> np.ndarray:
        return self.rng.choice(len(self.h), size=m, p=self.probs())

    def update(self, action: int, reward: float) -> None:
        pi = self.probs()
        self.pulls[action] += 1
        step = self.lr or 1.0 / self.pulls[action]
        adv = reward - self.baseline
        self.h -= step * adv * pi
        self.h[action] += step * adv
        self.t += 1
        self.baseline += (reward - self.baseline) / self.t


class Rewards:
    """The paper's certainty / diversity / loss rewards, z-normalised by running statistics."""

    def __init__(self, which: str, window: int):
        self.terms = ("cert", "div", "loss") if which == "all" else (which,)
        self.recent: deque[np.ndarray] = deque(maxlen=window)
        self.n, self.mean, self.m2 = 0, np.zeros(3), np.zeros(3)

    def raw(self, y: np.ndarray, clone_probs: np.ndarray) -> np.ndarray:
        """(cert, div, loss) for one answer ``y`` (K,) and the clone's prediction (K,)."""
        top2 = np.sort(y)[-2:]
        div = float(np.maximum(0.0, y - np.mean(self.recent, axis=0)).sum()) if self.recent else 0.0
        self.recent.append(y)
        loss = float(-(y * np.log(np.clip(clone_probs, 1e-12, None))).sum())
        return np.array([top2[1] - top2[0], div, loss])

    def __call__(self, y: np.ndarray, clone_probs: np.ndarray) -> float:
        r = self.raw(y, clone_probs)
        self.n += 1
        delta = r - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (r - self.mean)
        std = np.sqrt(self.m2 / self.n)
        z = np.where(std > 1e-8, (r - self.mean) / np.where(std > 1e-8, std, 1.0), 0.0)
        keep = [("cert", "div", "loss").index(t) for t in self.terms]
        return float(z[keep].mean())


class KnockoffAttack(ExtractionAttack):
    """KnockoffNets: clone the service from its probabilities (random or adaptive queries)."""

    name = "knockoff"
    requires = frozenset({"probabilities"})
    config_cls = KnockoffConfig
    alternative = "copycat (or jbda): they need only labels"
    presets = {"quick": QUICK}
    answer = "probabilities"

    def collect(self, oracle, pool, ctx):
        if self.config.policy == "random":
            query_random(oracle, pool, oracle.budget)
            return {"policy": "random"}
        return self._adaptive(oracle, pool, ctx)

    def _adaptive(self, oracle, pool, ctx):
        cfg = self.config
        actions = np.unique(pool.labels)
        bandit = ClassBandit(len(actions), ctx.rng, cfg.bandit_lr)
        rewards = Rewards(cfg.reward, cfg.diversity_window)
        trainer = CloneTrainer(ctx.new_clone(seed_offset=1), cfg.lr)
        total = 0.0
        while oracle.left > 0:
            m = min(cfg.bandit_batch, oracle.left)
            arms = bandit.sample(m)
            x = pool.images(np.array([pool.next_of_class(int(actions[a])) for a in arms]))
            y = oracle(x)
            trainer.clone.eval()
            with torch.no_grad():
                p = torch.softmax(trainer.clone(torch.from_numpy(x)), 1).numpy()
            for a, yi, pi in zip(arms, y, p):
                r = rewards(yi, pi)
                bandit.update(int(a), r)
                total += r
            xs, ys = oracle.transfer_set() if oracle.used > m else (x, y)
            old = ctx.rng.integers(0, len(xs) - m, m) if len(xs) > m else np.zeros(0, np.int64)
            trainer.step(np.concatenate([x, xs[old]]), np.concatenate([y, ys[old]]))
        ctx.say(f"knockoff adaptive: final arm probabilities {np.round(bandit.probs(), 3).tolist()}")
        return {"policy": "adaptive", "bandit": {
            "actions": [int(a) for a in actions], "pulls": bandit.pulls.tolist(),
            "final_probs": [round(float(v), 4) for v in bandit.probs()], "mean_reward": total / max(bandit.t, 1),
            "reward": cfg.reward, "actions_from": f"the '{cfg.pool}' pool's own labels"}}


ATTACKS.register(help="KnockoffNets extraction from probabilities (random / adaptive bandit queries)")(
    KnockoffAttack)
