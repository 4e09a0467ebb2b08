"""What a learning inversion attacker trains on and which private images it inverts: CEM's two protocols.

Xia et al. (CEM, CVPR 2025) evaluate their decoder attacker in two modes, and so does qdefend:

* ``infer_time`` (the default): the attacker holds images from the *test* distribution, the
  first ``N - n_eval`` images of the test set (9,000 of Fashion-MNIST's 10,000), and inverts the
  last ``n_eval`` (1,000). Nothing it trains on was seen by the victim.
* ``train_time``: the attacker holds images drawn from the *training* distribution: the aux split
  (disjoint from the victim's train/val data), and with ``overlap`` also the victim's own training
  images once the aux split runs out (``aux_size`` larger than it), as in CEM's strongest mode,
  where the decoder trains on the whole training set. It inverts the same last ``n_eval`` test
  images, so the two protocols are scored on the same private images and compare directly.

The last ``holdout`` fraction of the attacker's own images is held out for early stopping and
for the convergence curve; private test images are never used for either.

Paper: Xia et al., "Theoretical Insights in Model Inversion Robustness and Conditional Entropy
Maximization for Collaborative Inference Systems", CVPR 2025 (arXiv 2503.00383).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import AttackError, check_choice, check_positive

__all__ = ["PROTOCOLS", "AUGMENTS", "AttackerData", "AttackerSplit", "attacker_split", "augmented_views",
           "ATTACKER_FIELDS"]

PROTOCOLS = ("infer_time", "train_time")
# what the attacker does to its own images to make more (features, image) pairs: augmented_views
AUGMENTS = ("none", "flip", "shift", "flip+shift")
# the fields of AttackerData: `--set attacker.aux_size=20000` and `--set aux_size=20000` both set them
ATTACKER_FIELDS = ("protocol", "aux_size", "overlap", "n_eval", "holdout")


@dataclass
class AttackerData:
    """The data half of a learning inversion attack's config (mixed into its config dataclass)."""

    protocol: str = "infer_time"  # "infer_time" | "train_time" (see the module docstring)
    aux_size: int = 0  # attacker images; 0 = all the protocol offers (infer_time 9,000; train_time the aux split)
    overlap: bool = False  # train_time: may top up from the victim's training split past the aux split
    n_eval: int = 1000  # private images inverted: the last n_eval of the test set
    holdout: float = 0.1  # share of the attacker's images held out for early stopping / the curve

    def check_data(self) -> None:
        check_choice(self, "protocol", PROTOCOLS)
        check_positive(self, "aux_size", integer=True, allow_zero=True)
        check_positive(self, "n_eval", integer=True)
        if not isinstance(self.overlap, bool):
            raise AttackError(f"{getattr(self, 'attack_name', 'attack')}.overlap must be true or false, "
                              f"got {self.overlap!r}: e.g. --set attacker.overlap=true")
        if not isinstance(self.holdout, (int, float)) or isinstance(self.holdout, bool) or not 0 <= self.holdout < 0.5:
            raise AttackError(f"{getattr(self, 'attack_name', 'attack')}.holdout must be in [0, 0.5), "
                              f"got {self.holdout!r}: e.g. --set attacker.holdout=0.1")


@dataclass
class AttackerSplit:
    """The attacker's images (train / held-out) and the private images it must invert."""

    x_train: np.ndarray
    x_holdout: np.ndarray
    eval_idx: np.ndarray  # rows of data.test
    x_eval: np.ndarray
    pool: np.ndarray  # every attacker image (train + held-out): the mean-image floor and the oracle
    pool_labels: np.ndarray
    describe: dict[str, Any]


def attacker_split(data: Any, cfg: AttackerData) -> AttackerSplit:
    """Split ``data`` (a :class:`qdefend.data.SplitData`) as protocol ``cfg.protocol`` says."""
    n_test = len(data.test)
    n_eval = min(cfg.n_eval, n_test)
    eval_idx = np.arange(n_test - n_eval, n_test)
    if cfg.protocol == "infer_time":
        avail = n_test - n_eval
        if avail < 2:
            raise AttackError(f"infer_time needs test images besides the {n_eval} inverted ones; the test set has "
                              f"{n_test}: lower --set attacker.n_eval or use --set attacker.protocol=train_time")
        n = cfg.aux_size or avail
        if n > avail:
            raise AttackError(f"infer_time offers {avail} attacker images (the test set before the last {n_eval}), "
                              f"not aux_size={n}: lower it, or use --set attacker.protocol=train_time "
                              f"--set attacker.overlap=true for more")
        pool, labels = data.test.floats(slice(0, n)), data.test.labels[:n]
        sources, overlap = {"test[0:%d]" % n: n}, False
    else:
        n_aux = len(data.aux)
        n = cfg.aux_size or n_aux
        if n <= n_aux:
            pool, labels = data.aux.floats(slice(0, n)), data.aux.labels[:n]
            sources, overlap = {"aux": n}, False
        else:
            extra = n - n_aux
            if not cfg.overlap:
                raise AttackError(f"train_time: the disjoint aux split holds {n_aux} images, not aux_size={n}: "
                                  f"add --set attacker.overlap=true to draw the other {extra} from the victim's "
                                  f"training split (CEM's strongest mode), or lower aux_size")
            if extra > len(data.train):
                raise AttackError(f"train_time: aux + train hold {n_aux + len(data.train)} images, not "
                                  f"aux_size={n}: lower it")
            pool = np.concatenate([data.aux.floats(), data.train.floats(slice(0, extra))])
            labels = np.concatenate([data.aux.labels, data.train.labels[:extra]])
            sources, overlap = {"aux": n_aux, "train (overlaps the victim's training set)": extra}, True
    n_hold = int(round(cfg.holdout * len(pool)))
    if len(pool) - n_hold < 2:
        raise AttackError(f"the attacker has {len(pool)} images, too few to train on: raise aux_size")
    desc = {"protocol": cfg.protocol, "attacker_images": int(len(pool)), "train": int(len(pool) - n_hold),
            "holdout": n_hold, "sources": sources, "overlap_with_victim_training": overlap, "inverted": f"test[{n_test - n_eval}:{n_test}]", "n_eval": int(n_eval)}
    return AttackerSplit(x_train=pool[: len(pool) - n_hold], x_holdout=pool[len(pool) - n_hold:],
                         eval_idx=eval_idx, x_eval=data.test.floats(eval_idx), pool=pool,
                         pool_labels=np.asarray(labels), describe=desc)


def augmented_views(x: np.ndarray, kind: str, n: int, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` augmented copies of the attacker's images ``x`` (N, C, H, W) in [0,1]: (n, N, C, H, W).

    The attacker queries the target with them as with its own images, so each copy adds (features,
    image) pairs at the cost of N queries, and no training steps (a step takes, per image, one of its
    views at random). ``flip``: the mirror image (one copy; a second would repeat it). ``shift``: a
    translation by up to ``max_shift`` pixels each way, the border zero-filled (torchvision's
    RandomCrop with that padding). ``flip+shift``: a random shift, mirrored with probability 1/2. The
    CEM and ResSFL attackers train on flipped and cropped/rotated copies of their images in the same
    way (their data loaders' training transforms)."""
    if kind not in AUGMENTS or kind == "none":
        raise AttackError(f"augment must be one of {', '.join(AUGMENTS[1:])}, got {kind!r}")
    if kind == "flip" and n > 1:
        raise AttackError(f"augment=flip gives one more view of each image, not {n}: use views=2, or "
                          "augment=flip+shift for more")
    x = np.asarray(x, np.float32)
    out = np.empty((n, *x.shape), np.float32)
    s = int(max_shift)
    padded = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s))) if kind != "flip" else None
    h, w = x.shape[-2:]
    for v in range(n):
        if kind == "flip":
            out[v] = x[..., ::-1]
            continue
        dy, dx = rng.integers(-s, s + 1, size=(2, len(x)))
        for oy in range(-s, s + 1):
            for ox in range(-s, s + 1):
                m = (dy == oy) & (dx == ox)
                if m.any():
                    out[v, m] = padded[m, :, s + oy:s + oy + h, s + ox:s + ox + w]
        if kind == "flip+shift":
            m = rng.random(len(x)) < 0.5
            out[v, m] = out[v, m][..., ::-1]
    return out
