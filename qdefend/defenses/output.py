"""Service-side output defenses: post-processing of the probabilities the cloud service answers.

These run in the cloud after the head's softmax, not in training, so they compose with any trained
run (``divqat`` included) and change nothing on the device. Each keeps the service's top-1
answer (the label a customer pays for) and degrades what an extractor learns from the rest:

* ``round:N``  probabilities rounded to N decimals (Tramer et al. 2016, "Stealing Machine Learning
  Models via Prediction APIs", Sec. 7). A tie the rounding makes with the top class is broken by
  adding one unit 10^-N to the original top-1 entry, so it stays strictly first.
* ``topk:K``   only the K largest probabilities are kept, renormalised to sum 1; the others are 0
  (a baseline of Orekondy et al., "Prediction Poisoning", ICLR 2020; K=1 answers a one-hot label).
* ``reverse_sigmoid:beta=B,gamma=G``  Lee et al.'s deceptive perturbation (arXiv 1806.00054, the
  reverse sigmoid of its Sec. 3, as the Adversarial Robustness Toolbox's ReverseSigmoid computes it)::

      r  = beta * (s(gamma * s^-1(y)) - 1/2),   s = sigmoid, s^-1(y) = log(y / (1 - y))
      y~ = alpha * clip(y - r, 0, 1),           alpha = 1 / sum(clip(y - r, 0, 1))

  With gamma < 1 the map is not monotone near 0 (small probabilities are lifted towards beta/2),
  which is what misleads a clone trained on the answers, and can lift a small class above the
  top one; the original top-1 is then swapped back into first place (values permuted, sum kept).

Several compose in the order written with '+', e.g. ``reverse_sigmoid:beta=1,gamma=0.1+round:2``.
Use: ``qdefend attack runs/X --attack knockoff --artifact service:encoder.int8.tflite
--service-output round:2``, or ``parse_output_defense("round:2")(probs)``.

Paper: Lee, Edwards, Molloy, Su, "Defending Against NN Model Stealing Attacks Using Deceptive
Perturbations", IEEE S&P Workshops 2019 (arXiv 1806.00054).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..checks import check_number
from ..config import parse_value
from ..errors import QdefendError
from ..registry import Registry

__all__ = [
    "OUTPUT_DEFENSES", "OutputDefense", "OutputStack", "RoundProbabilities", "TopKProbabilities", "ReverseSigmoid",
    "RoundConfig", "TopKConfig", "ReverseSigmoidConfig", "parse_output_defense",
    "round_probabilities", "topk_probabilities", "reverse_sigmoid",
]

EXAMPLE = "e.g. --service-output round:2, topk:3 or reverse_sigmoid:beta=1,gamma=0.1 (join several with '+')"


def _rows(p) -> np.ndarray:
    a = np.asarray(p, np.float64)
    if a.ndim != 2 or a.shape[1] < 2:
        raise QdefendError(f"output defenses take (N, classes) probabilities with >= 2 classes, got shape {a.shape}")
    return a


def _keep_top1(orig: np.ndarray, out: np.ndarray, gap: float = 1e-6) -> np.ndarray:
    """``out`` (rows summing to 1) with each row's original top-1 first again: where another class
    overtook it the two values are swapped; a class left within a relative ``gap`` of it (a tie,
    e.g. several entries clipped to 1, or one float32 would merge) is lowered to top * (1 - gap),
    and such rows are renormalised."""
    out, idx, want = out.copy(), np.arange(len(out)), orig.argmax(1)
    got = out.argmax(1)
    rows = np.flatnonzero(want != got)
    out[rows, want[rows]], out[rows, got[rows]] = out[rows, got[rows]], out[rows, want[rows]]
    top = out[idx, want][:, None] * (1 - gap)
    close = out > top
    close[idx, want] = False
    rows = np.flatnonzero(close.any(1))
    if len(rows):
        out[rows] = np.where(close[rows], top[rows], out[rows])
        out[rows] /= out[rows].sum(1, keepdims=True)
    return out


def round_probabilities(p, decimals: int) -> np.ndarray:
    """``p`` rounded to ``decimals`` decimals; a tie with the top class is broken by one unit."""
    p = _rows(p)
    out, idx, top = np.round(p, decimals), np.arange(len(p)), p.argmax(1)
    others = out.copy()
    others[idx, top] = -np.inf
    rows = np.flatnonzero(others.max(1) >= out[idx, top])  # rounding made a tie with the top class
    out[rows, top[rows]] += 10.0 ** -decimals
    return out


def topk_probabilities(p, k: int) -> np.ndarray:
    """The ``k`` largest of each row kept (ties: lower class index first, as argmax), renormalised."""
    p = _rows(p)
    if k >= p.shape[1]:
        return p / p.sum(1, keepdims=True)
    keep = np.argsort(-p, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(p)
    np.put_along_axis(out, keep, np.take_along_axis(p, keep, 1), 1)
    s = out.sum(1, keepdims=True)
    return np.divide(out, s, out=np.eye(p.shape[1])[p.argmax(1)], where=s > 0)


def reverse_sigmoid(p, beta: float, gamma: float, *, eps: float = 1e-9) -> np.ndarray:
    """Lee et al.'s reverse sigmoid (see the module docstring), top-1 kept."""
    p = _rows(p)
    y = np.clip(p, eps, 1 - eps)
    r = beta * (1.0 / (1.0 + np.exp(-gamma * np.log(y / (1 - y)))) - 0.5)
    out = np.clip(p - r, 0.0, 1.0)
    s = out.sum(1, keepdims=True)
    out = np.divide(out, s, out=np.eye(p.shape[1])[p.argmax(1)], where=s > 0)
    return _keep_top1(p, out)


# ------------------------------------------------------------------------------ configs


@dataclass
class RoundConfig:
    decimals: int = 2

    def __post_init__(self):
        check_number(self.decimals, "service output 'round': decimals", lo=0, hi=8, integer=True, fix="round:2")


@dataclass
class TopKConfig:
    k: int = 1

    def __post_init__(self):
        check_number(self.k, "service output 'topk': k", lo=1, integer=True,
                     fix="topk:3 (topk:1 answers a one-hot label)")


@dataclass
class ReverseSigmoidConfig:
    beta: float = 1.0  # magnitude (ART's default)
    gamma: float = 0.1  # convergence; < 1 makes the map deceptive near 0 (ART's default)

    def __post_init__(self):
        for name in ("beta", "gamma"):
            check_number(getattr(self, name), f"service output 'reverse_sigmoid': {name}", lo=0, lo_open=True,
                         fix="reverse_sigmoid:beta=1,gamma=0.1")


# ------------------------------------------------------------------------------ defenses


class OutputDefense:
    """One service-side post-processing step: ``defense(probs) -> probs`` (N, classes)."""

    name: ClassVar[str] = "output"
    Config: ClassVar[type] = type("NoConfig", (), {})

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()

    def __call__(self, probs) -> np.ndarray:
        raise NotImplementedError

    def spec(self) -> str:
        """The canonical spec string, e.g. ``round:decimals=2`` (parse_output_defense reads it back)."""
        args = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self.config).items())
        return f"{self.name}:{args}" if args else self.name


OUTPUT_DEFENSES: Registry[type[OutputDefense]] = Registry("service output defense")


@OUTPUT_DEFENSES.register("round", help="probabilities rounded to N decimals (round:2)")
class RoundProbabilities(OutputDefense):
    name = "round"
    Config = RoundConfig

    def __call__(self, probs):
        return round_probabilities(probs, self.config.decimals)


@OUTPUT_DEFENSES.register("topk", help="only the K largest probabilities, renormalised (topk:3)")
class TopKProbabilities(OutputDefense):
    name = "topk"
    Config = TopKConfig

    def __call__(self, probs):
        return topk_probabilities(probs, self.config.k)


@OUTPUT_DEFENSES.register("reverse_sigmoid", help="Lee et al.'s deceptive reverse-sigmoid perturbation "
                                                  "(reverse_sigmoid:beta=1,gamma=0.1)")
class ReverseSigmoid(OutputDefense):
    name = "reverse_sigmoid"
    Config = ReverseSigmoidConfig

    def __call__(self, probs):
        return reverse_sigmoid(probs, self.config.beta, self.config.gamma)


class OutputStack:
    """Output defenses applied in the order written."""

    def __init__(self, defenses: list[OutputDefense]):
        self.defenses = list(defenses)

    def __call__(self, probs) -> np.ndarray:
        out = _rows(probs)
        for d in self.defenses:
            out = d(out)
        return out

    def spec(self) -> str:
        return "+".join(d.spec() for d in self.defenses)

    def tag(self) -> str:
        """A short file-name-safe label, e.g. ``reverse_sigmoid-b1-g0.1+round2``."""
        parts = []
        for d in self.defenses:
            vals = dataclasses.asdict(d.config)
            if len(vals) == 1:
                parts.append(f"{d.name}{next(iter(vals.values()))}")
            else:
                parts.append("-".join([d.name, *(f"{k[0]}{v}" for k, v in vals.items())]))
        return "+".join(parts)


def parse_output_defense(spec: str | None) -> OutputStack | None:
    """``"round:2"``, ``"topk:k=3"``, ``"reverse_sigmoid:beta=1,gamma=0.1+round:2"`` -> an
    OutputStack; ``None``, ``""`` or ``"none"`` -> None. Arguments are positional (in the config's
    field order) or KEY=VALUE."""
    if spec is None or spec.strip() in ("", "none"):
        return None
    defenses = []
    for item in spec.split("+"):
        name, _, args = item.strip().partition(":")
        if not name:
            raise QdefendError(f"bad service output '{spec}': {EXAMPLE}")
        cls = OUTPUT_DEFENSES.get(name.strip())
        fields = [f.name for f in dataclasses.fields(cls.Config)]
        kwargs: dict[str, Any] = {}
        for i, a in enumerate(x.strip() for x in args.split(",") if x.strip()):
            key, eq, val = a.partition("=")
            if not eq:
                if i >= len(fields):
                    raise QdefendError(f"service output '{name}' takes {len(fields)} argument(s) "
                                       f"({', '.join(fields)}), got '{args}': {EXAMPLE}")
                key, val = fields[i], a
            key = key.strip()
            if key not in fields:
                raise QdefendError(f"service output '{name}' has no parameter '{key}'. Valid: {', '.join(fields)}")
            kwargs[key] = parse_value(val)
        defenses.append(cls(cls.Config(**kwargs)))
    return OutputStack(defenses)
