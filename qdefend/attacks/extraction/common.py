"""What every model-extraction attack shares: metered victim access, the attacker's query pool,
the clone network, clone training and the accuracy/fidelity evaluation.

Threat model. The attacker sends images to the deployed service and reads its answers
(probabilities for KnockoffNets, top-1 labels for Copycat and JBDA); it never sees the victim's
weights, architecture or training data. Its own images come from a *query pool*: by default the
``aux`` split, 5,000 images from the victim's distribution that are disjoint from everything the
victim trained or selected on. ``pool="val"`` hands the attacker the victim's validation split
instead (a stronger attacker than the threat model; the result records it); the train split is
the victim's private data and the test split is where the clone is scored, so neither is allowed.
``pool=NAME`` of a transfer set (``qdefend.data.TRANSFER_SETS``: ``mnist5k``, 5,000 MNIST digits)
is the weaker attacker that has no image of the victim's distribution at all: KnockoffNets'
out-of-distribution transfer sets (Orekondy et al., CVPR 2019). Its images must have the victim's
input shape (channels, height, width; refused otherwise), they are labelled with the set's own
classes (the adaptive policy's actions, as in the paper), and the result records the pool as
out-of-distribution (``extra["pool"]``, and a note) unless the set comes from the victim's own
data set. Every pool but ``aux`` is its own attack variant, saved beside the default result
(``ATTACK-TARGET~pool-NAME.json``).

Budgets. ``budgets`` is a list (a curve): the attack collects one query sequence of
``max(budgets)`` images, and the clone for budget ``b`` is trained, from scratch, on the first
``b`` answers only. Every image sent to ``predict_proba``/``predict_labels`` counts as one query;
:class:`QueryOracle` refuses to go past the budget, so ``metrics["queries"]`` is exact. The
victim's answers on the test images (needed to measure fidelity) are evaluation, not attack,
and are counted separately (``extra["evaluation_queries"]``); ``eval_limit`` test images (the
first 5,000 by default: fidelity's standard error is then under 0.5 points) keep a slow victim
(the fake-quant torch encoder answers ~200 images/s on one thread) within the time budget.

Pool reuse. A budget larger than the pool re-uses pool images: each later use of an image is a
fresh random augmentation of it (shift by up to ``shift`` pixels with zero padding, and a
horizontal flip with probability 1/2), queried as a new image. Flips are natural for clothes and
objects; for digits (``mnist``, and the ``mnist5k`` transfer set) they are off unless asked for.
``reuse="none"`` refuses budgets above the pool size instead. ``train_augment`` (off by default)
also augments transfer-set images while training the clone, keeping the answer of the
un-augmented query as the target (no extra queries); measured on Fashion-MNIST it lowers fidelity
(0.89 vs 0.93 at 10k queries), because a shifted image's true answer differs from the kept soft
label.

Clone. The attacker does not know the victim's architecture: the default clone is ``cnn``, a
small LeNet-style float network (conv3x3(16w)-BN-ReLU-pool, conv3x3(32w)-BN-ReLU-pool,
fc(128w)-ReLU, fc), a different family and ~1/10 the compute of the VGG11 victim, chosen so a
10k-query curve trains in about two minutes on two CPU cores. Any ``qdefend.models`` name (e.g.
``resnet20``, ``mobilenet``) builds that whole network (encoder + head, no bottleneck) instead.
The clone normalises its [0,1] input with the pool's own per-channel mean/std (the attacker's
statistics, not the victim's: a transfer set's own, for an out-of-distribution pool). Training:
Adam, cosine learning-rate decay, soft cross-entropy against the victim's answers (probabilities,
or one-hot labels), ``max(min_steps, epochs x batches)`` steps, so small budgets still get enough
updates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..base import Attack, AttackError, check_choice, check_positive

__all__ = [
    "ExtractionConfig", "ExtractionAttack", "QueryOracle", "QueryPool", "Clone", "CloneTrainer",
    "augment", "build_clone", "pool_stats", "train_clone", "predict_labels", "soft_cross_entropy", "query_random",
    "check_pool_shape", "load_pool", "pool_choices", "POOL_SPLITS", "LOCAL_CLONES", "QUICK",
]

POOL_SPLITS = ("aux", "val")
QUICK = {"budgets": [200, 500], "epochs": 4, "min_steps": 40, "eval_limit": 500, "clone_width": 0.5}
LOCAL_CLONES = ("cnn",)
_NO_FLIP = ("mnist",)  # data sets whose images are not mirror-symmetric (a transfer set says so itself)


def pool_choices() -> tuple[str, ...]:
    """What ``pool`` may name: a split of the victim's data set, or a transfer set."""
    from qdefend.data import TRANSFER_SETS

    return (*POOL_SPLITS, *TRANSFER_SETS.names())


@dataclass
class ExtractionConfig:
    """Settings shared by the extraction attacks (see the module docstring for their meaning)."""

    attack_name: ClassVar[str] = "extraction"
    budgets: list[int] = field(default_factory=lambda: [1000, 2500, 5000, 10000])
    pool: str = "aux"  # the attacker's images: aux (default), val or a transfer set (mnist5k)
    reuse: str = "augment"  # budget > pool: "augment" re-uses pool images augmented, "none" refuses
    flip: bool | None = None  # horizontal flips in augmentation; None = yes except for digits (mnist, mnist5k)
    shift: int = 2  # max translation (pixels) in augmentation
    clone: str = "cnn"  # "cnn" or a qdefend.models name (resnet20, mobilenet, vgg11_bn)
    clone_width: float = 1.0
    epochs: int = 6
    min_steps: int = 200
    batch_size: int = 128
    lr: float = 2e-3
    train_augment: bool = False
    query_batch: int = 500  # images per victim call
    eval_limit: int = 5000  # test images for accuracy/fidelity; 0 = the whole test split

    def __post_init__(self):
        self.budgets = _parse_budgets(self.budgets, self.attack_name)
        if self.pool not in pool_choices():
            transfer = ", ".join(pool_choices()[len(POOL_SPLITS):]) or "none installed"
            raise AttackError(f"{self.attack_name}.pool must be a split of the victim's data set (aux, val) or a "
                              f"transfer set ({transfer}), got {self.pool!r}: e.g. --set pool=aux")
        check_choice(self, "reuse", ("augment", "none"))
        if self.flip is not None and not isinstance(self.flip, bool):
            raise AttackError(f"{self.attack_name}.flip must be true, false or unset, got {self.flip!r}: "
                              "e.g. --set flip=false")
        for name in ("epochs", "batch_size", "query_batch"):
            check_positive(self, name, integer=True)
        for name in ("min_steps", "eval_limit", "shift"):
            check_positive(self, name, integer=True, allow_zero=True)
        check_positive(self, "lr")
        check_positive(self, "clone_width")
        if self.clone not in LOCAL_CLONES:
            from qdefend.models import MODELS

            if self.clone not in MODELS:
                valid = ", ".join([*LOCAL_CLONES, *MODELS.names()])
                raise AttackError(f"{self.attack_name}.clone '{self.clone}' is unknown. Valid clones: {valid}: "
                                  "e.g. --set clone=cnn")


def _parse_budgets(value: Any, where: str) -> list[int]:
    """``10000``, ``"1000,5000"`` or ``[1000, 5000]`` -> sorted distinct positive ints."""
    items = value.replace(" ", "").split(",") if isinstance(value, str) else value
    items = [items] if isinstance(items, (int, float)) else list(items)
    try:
        out = sorted({int(v) for v in items if str(v) != ""})
        ok = bool(out) and out[0] > 0 and all(float(v) == int(float(v)) for v in items if str(v) != "")
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AttackError(f"{where}.budgets must be positive query counts, got {value!r}: "
                          "e.g. --set budgets=1000,2500,5000,10000")
    return out


# ---------------------------------------------------------------------------------------- pool


def augment(x01: np.ndarray, rng: np.random.Generator, *, shift: int = 2, flip: bool = True) -> np.ndarray:
    """Random translation by up to ``shift`` pixels (zero padding) and, with ``flip``, a horizontal
    flip with probability 1/2, per image; returns a new float32 array in [0, 1]."""
    x = np.asarray(x01, np.float32)
    n, _, h, w = x.shape
    out = np.empty_like(x)
    padded = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift))) if shift else x
    dy = rng.integers(0, 2 * shift + 1, n) if shift else np.zeros(n, int)
    dx = rng.integers(0, 2 * shift + 1, n) if shift else np.zeros(n, int)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    for a in np.unique(dy):
        for b in np.unique(dx[dy == a]):
            rows = np.flatnonzero((dy == a) & (dx == b))
            out[rows] = padded[rows, :, a:a + h, b:b + w]
    out[flips] = out[flips, ..., ::-1]
    return out


class QueryPool:
    """The attacker's own images. Hands them out in cyclic random orders (every image once before
    any image twice); a re-used image is queried as a fresh augmentation of itself."""

    def __init__(self, images01: np.ndarray, labels: np.ndarray | None, *, rng: np.random.Generator,
                 reuse: str = "augment", flip: bool = True, shift: int = 2, name: str = "aux"):
        self.x = np.asarray(images01, np.float32)
        self.labels = None if labels is None else np.asarray(labels, np.int64)
        self.rng, self.reuse, self.flip, self.shift, self.name = rng, reuse, flip, shift, name
        self.uses = np.zeros(len(self.x), np.int64)
        self._order = rng.permutation(len(self.x))
        self._next = 0
        self._class_orders: dict[int, np.ndarray] = {}
        self._class_next: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.x)

    def next_indices(self, n: int) -> np.ndarray:
        """The next ``n`` pool rows of one cyclic random order."""
        pos = (self._next + np.arange(n)) % len(self.x)
        self._next += n
        return self._order[pos]

    def next_of_class(self, c: int) -> int:
        """The next row labelled ``c`` in a cyclic random order of that class (the bandit's arms)."""
        if c not in self._class_orders:
            self._class_orders[c] = self.rng.permutation(np.flatnonzero(self.labels == c))
            self._class_next[c] = 0
        order = self._class_orders[c]
        k = self._class_next[c]
        self._class_next[c] = k + 1
        return int(order[k % len(order)])

    def images(self, idx: np.ndarray) -> np.ndarray:
        """Images for rows ``idx``: the image itself on first use, an augmentation afterwards."""
        idx = np.asarray(idx, np.int64)
        out = self.x[idx].copy()
        again = np.zeros(len(idx), bool)
        for j, i in enumerate(idx):
            again[j] = self.uses[i] > 0
            self.uses[i] += 1
        if again.any():
            if self.reuse == "none":
                raise AttackError(f"the query pool '{self.name}' has only {len(self)} images: lower the budgets "
                                  f"to <= {len(self)}, or --set reuse=augment to re-use pool images augmented")
            out[again] = augment(out[again], self.rng, shift=self.shift, flip=self.flip)
        return out

    def stats(self) -> dict[str, int]:
        return {"pool_images": len(self), "pool_images_queried": int((self.uses > 0).sum()),
                "augmented_queries": int(np.clip(self.uses - 1, 0, None).sum())}


# ---------------------------------------------------------------------------------------- victim


class QueryOracle:
    """Metered access to the victim: each image sent is one query, and the budget is a hard cap.

    ``answer`` "probabilities" returns the victim's (N, K) probabilities; "labels" returns its
    top-1 labels one-hot encoded, so every attack trains on (N, K) targets. Everything queried is
    kept in order (``x``, ``y``) so that the clone for budget b trains on the first b answers."""

    def __init__(self, target: Any, answer: str, budget: int, num_classes: int, batch: int = 500):
        self.target, self.answer, self.budget = target, answer, int(budget)
        self.num_classes, self.batch = int(num_classes), int(batch)
        self.used = 0
        self.calls = 0
        self.victim_s = 0.0
        self._x: np.ndarray | None = None  # (budget, C, H, W), filled in query order
        self._y = np.zeros((self.budget, self.num_classes), np.float32)

    @property
    def left(self) -> int:
        return self.budget - self.used

    def __call__(self, x01: np.ndarray) -> np.ndarray:
        x01 = np.asarray(x01, np.float32)
        if len(x01) > self.left:
            raise AttackError(f"query budget exceeded: {self.used} used + {len(x01)} asked > {self.budget}; "
                              "raise --set budgets=... (this is a bug in the attack if you did not change it)")
        outs = []
        for i in range(0, len(x01), self.batch):
            chunk = x01[i:i + self.batch]
            t0 = time.perf_counter()
            if self.answer == "probabilities":
                y = np.asarray(self.target.predict_proba(chunk), np.float32)
            else:
                y = np.eye(self.num_classes, dtype=np.float32)[np.asarray(self.target.predict_labels(chunk))]
            self.victim_s += time.perf_counter() - t0
            self.calls += 1
            self.used += len(chunk)
            outs.append(y)
        y = np.concatenate(outs) if outs else np.zeros((0, self.num_classes), np.float32)
        if self._x is None:
            self._x = np.zeros((self.budget, *x01.shape[1:]), np.float32)
        start = self.used - len(x01)
        self._x[start:self.used], self._y[start:self.used] = x01, y
        return y

    def transfer_set(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, answers) of every query so far, in query order (views, not copies)."""
        if self._x is None:
            raise AttackError("no queries were made: the budget must be >= 1")
        return self._x[:self.used], self._y[:self.used]


def query_random(oracle: QueryOracle, pool: QueryPool, n: int) -> None:
    """Query ``n`` pool images in random order (KnockoffNets' random policy, Copycat)."""
    while n > 0:
        m = min(n, oracle.batch)
        oracle(pool.images(pool.next_indices(m)))
        n -= m


# ---------------------------------------------------------------------------------------- clone


def pool_stats(x01: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (floored at 1e-3) of the attacker's own images: its normalisation."""
    return x01.mean(axis=(0, 2, 3)).tolist(), np.maximum(x01.std(axis=(0, 2, 3)), 1e-3).tolist()


class Clone(nn.Module):
    """[0,1] pixels -> logits: the attacker's normalisation followed by its network."""

    def __init__(self, net: nn.Module, mean, std, arch: str):
        super().__init__()
        self.net = net
        self.arch = arch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net((x01 - self.mean) / self.std)


def _cnn(in_ch: int, hw: tuple[int, int], num_classes: int, width: float) -> nn.Sequential:
    c1, c2, fc = (max(1, round(c * width)) for c in (16, 32, 128))
    h, w = (math.ceil(math.ceil(s / 2) / 2) for s in hw)
    return nn.Sequential(
        nn.Conv2d(in_ch, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(1), nn.Linear(c2 * h * w, fc), nn.ReLU(), nn.Linear(fc, num_classes),
    )


def build_clone(arch: str, width: float, in_shape: tuple[int, int, int], num_classes: int,
                mean, std, seed: int = 0) -> Clone:
    """A fresh float clone: ``cnn`` or a whole ``qdefend.models`` network, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if arch == "cnn":
            net = _cnn(in_shape[0], tuple(in_shape[1:]), num_classes, width)
        else:
            from qdefend.models import ModelConfig, build_model

            cfg = ModelConfig(arch, cut=1, bottleneck_channels=0, sigmoid=False, width=width, head_width=width)
            net = build_model(cfg, tuple(in_shape), num_classes)
    return Clone(net, mean, std, arch)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k (CE for one-hot targets)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


class CloneTrainer:
    """Adam on soft cross-entropy; with ``total_steps`` the learning rate decays cosine to zero."""

    def __init__(self, clone: Clone, lr: float, total_steps: int | None = None):
        self.clone = clone
        self.opt = torch.optim.Adam(clone.parameters(), lr=lr)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(total_steps, 1))
                      if total_steps else None)

    def step(self, x01: np.ndarray, targets: np.ndarray) -> float:
        self.clone.train()
        loss = soft_cross_entropy(self.clone(torch.from_numpy(x01)), torch.from_numpy(targets))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return loss.item()


def train_clone(clone: Clone, x01: np.ndarray, targets: np.ndarray, *, steps: int, batch_size: int, lr: float,
                rng: np.random.Generator, augment_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Clone:
    """Train ``clone`` for ``steps`` Adam steps on (images, soft targets); epochs of random batches."""
    n = len(x01)
    bs = min(batch_size, n)
    trainer = CloneTrainer(clone, lr, steps)
    order, pos = rng.permutation(n), 0
    for _ in range(steps):
        if pos + bs > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + bs]
        pos += bs
        if len(idx) < 2:  # BatchNorm needs two samples
            continue
        xb = x01[idx]
        trainer.step(augment_fn(xb) if augment_fn else xb, targets[idx])
    return clone.eval()


def clone_steps(n: int, epochs: int, batch_size: int, min_steps: int) -> int:
    return max(min_steps, epochs * math.ceil(n / min(batch_size, n)))


@torch.no_grad()
def predict_labels(clone: Clone, x01: np.ndarray, batch: int = 1000) -> np.ndarray:
    clone.eval()
    return np.concatenate([clone(torch.from_numpy(x01[i:i + batch])).argmax(1).numpy()
                           for i in range(0, len(x01), batch)]) if len(x01) else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------- attack


@dataclass
class _Context:
    """What ``collect`` gets besides the oracle and the pool."""

    cfg: ExtractionConfig
    rng: np.random.Generator
    seed: int
    in_shape: tuple[int, int, int]
    num_classes: int
    mean: list[float]
    std: list[float]
    flip: bool
    say: Callable[[str], None]

    def new_clone(self, seed_offset: int = 0) -> Clone:
        return build_clone(self.cfg.clone, self.cfg.clone_width, self.in_shape, self.num_classes,
                           self.mean, self.std, self.seed + seed_offset)

    def augmenter(self) -> Callable[[np.ndarray], np.ndarray] | None:
        if not self.cfg.train_augment:
            return None
        return lambda x: augment(x, self.rng, shift=self.cfg.shift, flip=self.flip)


def check_pool_shape(pool_shape, victim_shape, pool: str) -> None:
    """AttackError unless the pool's images (C, H, W) have the victim's input shape: a clone and
    the victim take one size of image, and resizing a transfer set is not the attacker's default."""
    a, b = tuple(int(v) for v in pool_shape), tuple(int(v) for v in victim_shape)
    if a != b:
        have, need = ("x".join(map(str, t)) for t in (a, b))
        raise AttackError(f"the '{pool}' pool holds {have} images (channels x height x width) but the victim "
                          f"takes {need}: pick a pool of the victim's input shape, e.g. --set pool=aux")


def load_pool(pool: str, data: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any], bool]:
    """(images float32 [0,1], labels, JSON-ready description, whether flips are natural) of the
    query pool ``pool``: a split of the victim's data set ``data`` (a SplitData), or a transfer set
    of the victim's input shape (``qdefend.data.TRANSFER_SETS``)."""
    if pool in POOL_SPLITS:
        split = data.split(pool)
        info = {"name": pool, "kind": "split", "split": pool, "dataset": data.name, "out_of_distribution": False}
        return split.floats(), split.labels, info, data.name not in _NO_FLIP
    from qdefend.data import load_transfer_set

    ts = load_transfer_set(pool)
    check_pool_shape(ts.images.shape[1:], data.shape, pool)
    info = {"name": pool, "kind": "transfer_set", "dataset": ts.dataset, "source": ts.source,
            "classes": len(ts.class_names), "out_of_distribution": ts.dataset != data.name}
    return ts.images, ts.labels, info, ts.flip


class ExtractionAttack(Attack):
    """Collect a query sequence (``collect``, per attack), then train and score a clone per budget."""

    family = "extraction"
    answer: ClassVar[str] = "probabilities"  # what the attack reads from the victim

    def variant(self) -> str:
        """``pool-NAME`` for any pool but the default ``aux`` (another attacker: its own result file)."""
        return "" if self.config.pool == "aux" else f"pool-{self.config.pool}"

    def collect(self, oracle: QueryOracle, pool: QueryPool, ctx: _Context) -> dict | None:
        """Spend up to ``oracle.budget`` queries; return JSON-ready details for ``extra`` (may hold
        "notes", a list of sentences)."""
        raise NotImplementedError

    def _run(self, target, data, seed, say):
        cfg = self.config
        rng = np.random.default_rng(seed)
        pool_x, pool_y, pool_info, natural_flip = load_pool(cfg.pool, data)
        flip = cfg.flip if cfg.flip is not None else natural_flip
        budget = cfg.budgets[-1]
        if cfg.reuse == "none" and budget > len(pool_x):
            raise AttackError(f"budget {budget} exceeds the {len(pool_x)} images of the '{cfg.pool}' pool: lower "
                              f"--set budgets=... to <= {len(pool_x)}, or --set reuse=augment")
        mean, std = pool_stats(pool_x)
        pool = QueryPool(pool_x, pool_y, rng=rng, reuse=cfg.reuse, flip=flip, shift=cfg.shift, name=cfg.pool)
        ctx = _Context(cfg, rng, seed, tuple(data.shape), data.num_classes, mean, std, flip, say)
        oracle = QueryOracle(target, self.answer, budget, data.num_classes, cfg.query_batch)
        timings: dict[str, float] = {}

        say(f"{self.name}: querying {target.name} ({self.answer}) up to {budget} times from the {cfg.pool} pool")
        t0 = time.perf_counter()
        info = dict(self.collect(oracle, pool, ctx) or {})
        timings["collect_s"] = round(time.perf_counter() - t0, 3)
        timings["victim_s"] = round(oracle.victim_s, 3)
        xq, yq = oracle.transfer_set()

        t0 = time.perf_counter()
        n_eval = min(cfg.eval_limit or len(data.test), len(data.test))
        x_test, y_test = data.test.floats(slice(0, n_eval)), data.test.labels[:n_eval]
        # fidelity is to the model the attacker is after: the target's answers, or for a zoo its true model
        labels_of = getattr(target, "reference_labels", None) or target.predict_labels
        victim = np.concatenate([np.asarray(labels_of(x_test[i:i + cfg.query_batch]))
                                 for i in range(0, n_eval, cfg.query_batch)])
        timings["victim_eval_s"] = round(time.perf_counter() - t0, 3)

        curve = []
        for b in cfg.budgets:
            n = min(b, len(xq))
            t0 = time.perf_counter()
            clone = ctx.new_clone()
            steps = clone_steps(n, cfg.epochs, cfg.batch_size, cfg.min_steps)
            train_clone(clone, xq[:n], yq[:n], steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, rng=rng,
                        augment_fn=ctx.augmenter())
            pred = predict_labels(clone, x_test)
            point = {"budget": b, "queries": n, "steps": steps, "clone_acc": float((pred == y_test).mean()),
                     "fidelity": float((pred == victim).mean()), "train_s": round(time.perf_counter() - t0, 3)}
            curve.append(point)
            say(f"{self.name}: budget {b}: clone acc {point['clone_acc']:.4f}, fidelity {point['fidelity']:.4f} "
                f"({point['train_s']:.0f} s)")
        timings["train_s"] = round(sum(p["train_s"] for p in curve), 3)

        last = curve[-1]
        metrics = {"victim_acc": float((victim == y_test).mean()), "clone_acc": last["clone_acc"],
                   "fidelity": last["fidelity"], "queries": float(oracle.used)}
        for p in curve:
            metrics[f"clone_acc@{p['budget']}"] = p["clone_acc"]
            metrics[f"fidelity@{p['budget']}"] = p["fidelity"]
        stats = pool.stats()
        reused = stats["augmented_queries"]
        if pool_info["kind"] == "split":
            what = f"the '{cfg.pool}' split ({len(pool)} images the victim never trained on)"
        elif pool_info["out_of_distribution"]:
            what = (f"the out-of-distribution transfer set '{cfg.pool}' ({len(pool)} {pool_info['dataset']} images, "
                    f"none from the victim's data set {data.name}; labelled with its own {pool_info['classes']} "
                    "classes)")
        else:
            what = (f"the transfer set '{cfg.pool}' ({len(pool)} {pool_info['dataset']} images): the victim's own "
                    "data set, so not out-of-distribution, and they may overlap its training images")
        notes = [f"query pool: {what}; "
                 + (f"{reused} of {oracle.used} queries were augmented re-uses of pool images "
                    f"(shift <= {cfg.shift} px{', horizontal flip' if flip else ''})" if reused else
                    "no pool image was queried twice")]
        if cfg.pool == "val":
            notes.append("the pool is the victim's validation split: a stronger attacker than the aux threat model")
        extra = {"curve": curve, "answer": self.answer, "evaluation_queries": int(n_eval),
                 "victim_calls": oracle.calls, "pool": {**pool_info, **stats, "flip": flip},
                 "clone": {"arch": cfg.clone, "width": cfg.clone_width,
                           "params": int(sum(p.numel() for p in clone.parameters())),
                           "normalization": {"mean": mean, "std": std}},
                 "notes": notes + list(info.pop("notes", []))}
        extra.update(info)
        return self.result(target, seed, metrics, timings=timings, extra=extra)
