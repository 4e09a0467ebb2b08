"""Fingerprint-then-extract: learn which requested targets pin which hidden model of a served zoo,
pin the most accurate one, then steal it with KnockoffNets.

A model zoo (``qdefend serve --zoo``) answers each request with the head its selection policy picks
for the request's accuracy / latency targets, and never says which. A naive KnockoffNets attacker
(``mode=naive``: each request carries targets drawn at random from the target box, as a population
of users would send) trains its clone on answers from a *mix* of models. The fingerprinting attacker
first maps the target space to models, with few queries:

1. **Probes.** ``probes`` pool images, encoded once with the public encoder: the same int8 bytes go
   out every time, so a deterministic head answers them identically, and two heads almost never do.
   An answer's *signature* is its probability matrix; answers within ``signature_tol`` (max abs
   difference) are the same model, a refusal (422) is its own outcome.
2. **Accuracy search** at the loosest latency: a coarse scan of ``accuracy_steps`` targets over
   ``accuracy_range``, then bisection between neighbours with different signatures down to
   ``accuracy_tol``, which finds every band of accuracy targets one model answers.
3. **Victim and pin.** ``pin_repeats`` single asks just under the top of the served range (where
   a model that noise leaves a minority would show), then the victim is the model whose lowest
   sighting (any single ask, not the majority) is the highest: the model that answers only the most demanding targets, the zoo's
   most accurate one, even where target noise leaves it a minority of the answers. Without noise
   it is the model of the highest answered band. Three candidate accuracies in its band (the
   middle, three quarters up, and just under its upper end) are each asked ``pin_repeats`` times;
   the pin is the one the victim answered most often (ties: the middle, the farthest point from
   both boundaries). Without target noise all three always tie; with it, the attacker measures
   where the map is steadiest.
   ``pin=center`` skips that measurement and pins the middle (an attacker that does not probe
   the noise).
4. **Latency search** at the pinned accuracy: ``latency_steps`` targets over ``latency_range_ms``
   (log-spaced); the pinned latency is the geometric middle of the victim's run of latencies.
5. **Extraction**: KnockoffNets (this module subclasses it: same pool, policies, clone and
   training) with every query carrying the pinned targets.

``repeats`` > 1 asks each target that many times and keeps the majority signature (against target
noise). ``vote`` > 1 does the same for the extraction: each image is asked ``vote`` times at the
pinned targets and its most frequent answer is kept (answers within ``signature_tol`` are one
answer; ties: the first asked). Against target noise that serves the victim more often than not at
the pin, this filters out the other models' answers, at the price of ``vote`` queries an image: the
extraction budget counts every ask, so the clone trains on budget // vote images. The
fingerprinting queries are counted apart from the extraction budget and capped by
``max_fingerprint_queries``.

``filter=R`` (R >= 1 asks, or ``auto``; 0 = off) is the *filtering attacker*, against target noise
that moves the victim's requests to one lower model (``--target-noise drop``): the answers at the
pin are then the victim's or that model's, and the attacker can tell them apart image by image.
After the pin it picks a *reference* model from its own map: the model other than the victim
that its single asks in the victim's band saw most often (with none seen there, the band just
below the victim's); and a *reference pin*: of the accuracy targets it asked at the loosest
latency, the one the reference answered most often (ties: the middle of the longest run of
them), checked with ``pin_repeats`` more asks (fingerprinting queries). The extraction then asks
each image R times at the pin plus once at the reference pin, from one encoding (the same bytes,
so one model gives one answer), keeps the first of its R answers that differs (beyond
``signature_tol``) from the reference's, which is then not the reference model's, and drops the
image if none differs. Every ask is paid for: the clone trains on the kept answers of budget //
(R + 1) images, expected (budget / (R + 1)) x (1 - (1 - s)^R) with s the victim's share at the
pin. ``auto`` estimates s as the share of the victim among the fingerprint's single asks at the
pinned accuracy (pin candidates and latency scan, any latency), and takes the R in 1..``MAX_FILTER_ASKS`` that maximizes that expectation (no
filtering when the victim answered every one of them: nothing to filter). Should no answer pass,
the clone trains on every image's first answer at the pin (recorded as a fallback). The filter
trusts the reference pin: a reference pin that noise also moves lets the reference model's
answers through. One budget only (the kept answers are not a query prefix).

``filter=seq`` is the *sequential filtering attacker*: the same reference and pins, but it stops
asking an image as soon as it has what it needs. Each image is asked once at the reference pin,
then at the pin again and again until an answer differs from the reference's (kept) or after
``MAX_SEQ_ASKS`` asks (dropped); images are taken from the pool for as long as the budget lasts.
An image then costs 1 + (1 - (1 - s)^M) / s asks instead of R + 1, so the kept answers per query
rise from max_R (1 - (1 - s)^R) / (R + 1) to about s / (1 + s): at s = 0.15, 0.13 against 0.10
(a third more).

``tag=true`` is the *tagging attacker*, against any noise that picks one model per request: every
extraction request carries the fingerprint's probe features (the same bytes as when fingerprinting)
besides up to ``max_batch - probes`` images, and the probes' answers name the model that answered
the whole request: requests whose probes come back with the victim's signature are kept, the rest
dropped. The probes are paid for (budget = images + probes x requests), so the clone trains on
about budget x (1 - probes / max_batch) x s images, s the victim's share of requests at the pin:
more than the filter keeps at any s, with no reference model to trust. It needs the random query
policy (whole requests) and one budget; should no request pass, the clone trains on every answer
(a recorded fallback). Target noise drawn per image (``--target-noise drop:0.8/image``) defeats it:
a request's probes then say nothing of its other images' models (the filters still apply, and
the fingerprint should then ask one probe at a time, ``probes=1``: several probes would come back
from several models at once and look like a model never seen).

With the operator's ground truth on the target (in-process scoring),
the result also reports the identification accuracy: the share of 201 accuracy targets over the
range (at the loosest latency) for which the attacker's band map names the model the zoo's
noise-free policy selects, and whether the pinned model is the zoo's most accurate.

Paper: Sanyal et al., "Pareto-Secure Machine Learning (PSML): Fingerprinting and Securing Inference
Serving Systems", arXiv 2307.01292. KnockoffNets: Orekondy et al., CVPR 2019.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..base import ATTACKS, AttackError, check_choice, check_positive
from .common import QUICK
from .knockoff import KnockoffAttack, KnockoffConfig

__all__ = ["FingerprintConfig", "FingerprintAttack", "Fingerprinter", "MajorityVote", "ReferenceFilter",
           "SequentialFilter", "ProbeTag", "REFUSED", "filter_asks"]

REFUSED = -1  # the outcome of a refused request
MAX_FILTER_ASKS = 8  # filter=auto: the most asks an image at the pin
MAX_SEQ_ASKS = 16  # filter=seq: the most asks an image at the pin before it is dropped


@dataclass
class FingerprintConfig(KnockoffConfig):
    """KnockoffNets settings plus the fingerprinting search (see the module docstring)."""

    attack_name: ClassVar[str] = "fingerprint"
    mode: str = "fingerprint"  # fingerprint | naive
    probes: int = 10
    accuracy_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    latency_range_ms: list[float] = field(default_factory=lambda: [0.05, 1000.0])
    accuracy_steps: int = 11
    latency_steps: int = 8
    accuracy_tol: float = 0.002
    repeats: int = 1
    signature_tol: float = 1e-4
    pin: str = "steady"  # steady | center
    pin_repeats: int = 3
    vote: int = 1
    filter: int | str = 0  # asks an image at the pin, plus one at the reference pin; auto; seq; 0 = off
    tag: bool = False  # every extraction request carries the probes; keep the requests the victim answered
    max_fingerprint_queries: int = 3000

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "mode", ("fingerprint", "naive"))
        check_choice(self, "pin", ("steady", "center"))
        for name in ("probes", "repeats", "pin_repeats", "vote", "max_fingerprint_queries"):
            check_positive(self, name, integer=True)
        if self.vote > 1 and self.mode != "fingerprint":
            raise AttackError(f"fingerprint.vote={self.vote} repeats the pinned extraction queries; mode={self.mode} "
                              "pins nothing: use --set mode=fingerprint, or drop vote")
        if self.filter not in ("auto", "seq"):
            if isinstance(self.filter, str):
                raise AttackError(f"fingerprint.filter must be a number of asks an image, auto or seq, got "
                                  f"{self.filter!r}: e.g. --set filter=3, --set filter=auto or --set filter=seq")
            check_positive(self, "filter", integer=True, allow_zero=True, example=3)
        if self.filter:
            if self.mode != "fingerprint" or self.vote > 1:
                raise AttackError(f"fingerprint.filter={self.filter} filters the pinned extraction's answers; it needs "
                                  f"mode=fingerprint and vote=1 (got mode={self.mode}, vote={self.vote}): drop filter "
                                  "or vote")
            if len(self.budgets) > 1:
                raise AttackError(f"fingerprint.filter trains on the answers its whole budget kept, not on a query "
                                  f"prefix: give one budget, not {self.budgets}: e.g. --set budgets={self.budgets[-1]}")
            if self.filter not in ("auto", "seq") and self.filter + 1 > self.budgets[-1]:
                raise AttackError(f"fingerprint.filter={self.filter} asks each image {self.filter + 1} times, more than "
                                  f"the budget {self.budgets[-1]}: lower filter or raise --set budgets=...")
        if self.tag:
            if self.mode != "fingerprint" or self.vote > 1 or self.filter:
                raise AttackError(f"fingerprint.tag keeps whole requests by their probes' answers; it needs "
                                  f"mode=fingerprint, vote=1 and filter=0 (got mode={self.mode}, vote={self.vote}, "
                                  f"filter={self.filter}): drop tag, vote or filter")
            if self.policy != "random" or len(self.budgets) > 1:
                raise AttackError(f"fingerprint.tag sends whole requests of images (the random policy) and trains on "
                                  f"what its whole budget kept: it needs policy=random and one budget (got "
                                  f"policy={self.policy}, budgets={self.budgets}): e.g. --set budgets="
                                  f"{self.budgets[-1]}")
        if self.vote > self.budgets[-1]:
            raise AttackError(f"fingerprint.vote={self.vote} asks each image that many times, more than the budget "
                              f"{self.budgets[-1]}: lower vote or raise --set budgets=...")
        for name in ("accuracy_steps", "latency_steps"):
            check_positive(self, name, integer=True)
            if getattr(self, name) < 2:
                raise AttackError(f"fingerprint.{name} must be >= 2, got {getattr(self, name)}: e.g. --set {name}=8")
        check_positive(self, "accuracy_tol")
        check_positive(self, "signature_tol")
        a, lat = self.accuracy_range, self.latency_range_ms
        if len(a) != 2 or not 0 <= a[0] < a[1] <= 1:
            raise AttackError(f"fingerprint.accuracy_range must be [lo, hi] with 0 <= lo < hi <= 1, got {a}: "
                              "e.g. --set accuracy_range=[0.5,1.0]")
        if len(lat) != 2 or not 0 < lat[0] < lat[1]:
            raise AttackError(f"fingerprint.latency_range_ms must be [lo, hi] with 0 < lo < hi, got {lat}: "
                              "e.g. --set latency_range_ms=[0.05,1000]")


class Fingerprinter:
    """The map from targets to (anonymous) models, learned by asking ``ask(targets)`` for the
    probes' answers (None when refused). Each ask costs ``probes`` queries."""

    def __init__(self, ask: Callable[[tuple[float, float]], np.ndarray | None], probes: int, *, tol: float,
                 repeats: int = 1, limit: int = 3000):
        self.ask, self.probes, self.tol, self.repeats, self.limit = ask, probes, tol, repeats, limit
        self.signatures: list[np.ndarray] = []
        self.queries = 0
        self.log: list[tuple[float, float, int]] = []  # (accuracy, latency_ms, outcome) of every target asked
        self.seen: list[tuple[float, float, int]] = []  # (accuracy, latency_ms, answer) of every single ask

    def _classify(self, p: np.ndarray | None) -> int:
        if p is None:
            return REFUSED
        for k, s in enumerate(self.signatures):
            if np.abs(s - p).max() <= self.tol:
                return k
        self.signatures.append(p)
        return len(self.signatures) - 1

    def outcome(self, accuracy: float, latency_ms: float) -> int:
        """The model (cluster id) or REFUSED for these targets (majority over ``repeats`` asks)."""
        votes = []
        for _ in range(self.repeats):
            if self.queries + self.probes > self.limit:
                raise AttackError(f"fingerprinting needs more than max_fingerprint_queries={self.limit} queries: "
                                  "raise it, or coarsen the search (--set accuracy_tol=0.005)")
            self.queries += self.probes
            votes.append(self._classify(self.ask((accuracy, latency_ms))))
            self.seen.append((accuracy, latency_ms, votes[-1]))
        k = Counter(votes).most_common(1)[0][0]
        self.log.append((accuracy, latency_ms, k))
        return k

    def accuracy_bands(self, lo: float, hi: float, steps: int, latency_ms: float,
                       tol: float) -> list[tuple[float, float, int]]:
        """[(from, to, outcome)] over [lo, hi]: coarse scan, then bisection of every change."""
        points = [(float(a), self.outcome(float(a), latency_ms)) for a in np.linspace(lo, hi, steps)]

        def refine(a0, c0, a1, c1):
            if c0 == c1 or a1 - a0 <= tol:
                return
            m = (a0 + a1) / 2
            cm = self.outcome(m, latency_ms)
            points.append((m, cm))
            refine(a0, c0, m, cm)
            refine(m, cm, a1, c1)

        for (a0, c0), (a1, c1) in zip(list(points), list(points[1:])):
            refine(a0, c0, a1, c1)
        return _runs(sorted(points), lo, hi)

    def latency_runs(self, accuracy: float, lo: float, hi: float, steps: int) -> list[tuple[float, float, int]]:
        """[(from, to, outcome)] over log-spaced latency targets at ``accuracy``."""
        points = [(math.log(v), self.outcome(accuracy, float(v))) for v in np.geomspace(lo, hi, steps)]
        return [(math.exp(a), math.exp(b), c) for a, b, c in _runs(points, math.log(lo), math.log(hi))]


def _ask_pinned(target: Any, feats, reference: tuple[float, float] | None = None,
                at: tuple[float, float] | None = None) -> np.ndarray:
    """The zoo's answers to encoded ``feats`` at the pinned targets (or ``at``: a filter's
    ``reference`` pin); a refusal is an AttackError naming the pins."""
    from qdefend.attacks.zoo import Refused

    try:
        return target.ask(feats, at or target.targets)
    except Refused:
        also = "" if reference is None else f" or the reference pin {reference}"
        raise AttackError(f"zoo target: the zoo refuses the pinned targets {target.targets}{also}: pin "
                          "reachable ones") from None


class MajorityVote:
    """The pinned zoo target asked ``votes`` times per image; each image keeps its most frequent
    answer (answers within ``tol`` are one). What the extraction oracle queries when ``vote`` > 1."""

    def __init__(self, target: Any, votes: int, tol: float):
        self.target, self.votes, self.tol = target, votes, tol
        self.images = self.split = 0  # images answered; of them, those whose asks did not all agree

    def predict_proba(self, images01: np.ndarray) -> np.ndarray:
        feats = self.target.encode(images01)
        asks = np.stack([_ask_pinned(self.target, feats) for _ in range(self.votes)])
        out = np.empty_like(asks[0])
        for i in range(asks.shape[1]):
            out[i], agreed = _mode(asks[:, i], self.tol)
            self.split += not agreed
        self.images += asks.shape[1]
        return out


class ReferenceFilter:
    """The filtering attacker's oracle: each image asked ``asks`` times at the pinned targets and
    once at ``reference`` (a pin only the reference model answers), from one encoding; an image's
    answer is the first of its pinned answers that differs from the reference's (beyond ``tol``),
    and ``kept`` records, in query order, whether it had one. A dropped image's answer is the
    reference's (the caller trains on kept images only)."""

    def __init__(self, target: Any, asks: int, reference: tuple[float, float], tol: float):
        self.target, self.asks, self.reference, self.tol = target, asks, reference, tol
        self.kept: list[np.ndarray] = []
        self.first: list[np.ndarray] = []  # every image's first answer at the pin (the fallback)
        self.images = 0

    def predict_proba(self, images01: np.ndarray) -> np.ndarray:
        feats = self.target.encode(images01)
        pinned = np.stack([_ask_pinned(self.target, feats, self.reference) for _ in range(self.asks)])
        ref = _ask_pinned(self.target, feats, self.reference, at=self.reference)
        differs = np.abs(pinned - ref[None]).max(2) > self.tol  # (asks, images)
        keep = differs.any(0)
        out = np.where(keep[:, None], pinned[differs.argmax(0), np.arange(len(ref))], ref)
        self.kept.append(keep)
        self.first.append(pinned[0])
        self.images += len(ref)
        return out


class SequentialFilter:
    """The sequential filtering attacker's oracle: each image asked once at ``reference``, then at
    the pinned targets until an answer differs from the reference's (beyond ``tol``; kept) or
    ``most`` asks were made (dropped), never spending more than ``budget`` asks in all; images that
    come after the budget is spent are not asked (dropped). ``kept`` and ``first`` as for
    :class:`ReferenceFilter` (an image never asked at the pin has the reference's answer as its first)."""

    def __init__(self, target: Any, most: int, reference: tuple[float, float], tol: float, budget: int):
        self.target, self.most, self.reference, self.tol, self.budget = target, most, reference, tol, budget
        self.kept: list[np.ndarray] = []
        self.first: list[np.ndarray] = []
        self.images = self.spent = 0  # images asked at the reference pin; asks made in all
        self.width = 0  # the answers' width (classes), from the first answer

    def _ask(self, f, rows: np.ndarray, at: tuple[float, float] | None = None) -> np.ndarray:
        """Ask the zoo about images ``rows`` of ``f`` at the pin (or ``at``), and pay for them."""
        self.spent += len(rows)
        return _ask_pinned(self.target, type(f)(f.q[rows], f.scale, f.zero_point, f.bits), self.reference, at)

    def predict_proba(self, images01: np.ndarray) -> np.ndarray:
        f = self.target.encode(images01)
        n = len(f.q)
        asked = np.arange(min(n, self.budget - self.spent))
        keep = np.zeros(n, bool)
        out = np.zeros((n, self.width), np.float32)
        if len(asked):
            ref = self._ask(f, asked, at=self.reference)
            self.width = ref.shape[1]
            out = np.zeros((n, ref.shape[1]), np.float32)
            out[asked] = ref
            first = out.copy()
            todo = asked
            for k in range(self.most):
                todo = todo[:max(0, self.budget - self.spent)]
                if not len(todo):
                    break
                ans = self._ask(f, todo)
                if k == 0:
                    first[todo] = ans
                differs = np.abs(ans - out[todo]).max(1) > self.tol
                out[todo[differs]], keep[todo[differs]] = ans[differs], True
                todo = todo[~differs]
            self.first.append(first)
        else:
            self.first.append(out)
        self.kept.append(keep)
        self.images += len(asked)
        return out


class ProbeTag:
    """The tagging attacker's oracle: each request carries the ``probes`` features (encoded once)
    and up to ``room`` images under the pinned targets; the zoo picks one model per request, so a
    request is kept when the probes' answers match ``signature`` (the victim's, within ``tol``).
    ``kept`` records, in query order, whether each image's request was kept."""

    def __init__(self, target: Any, probes, signature: np.ndarray, room: int, tol: float):
        self.target, self.probes, self.signature, self.room, self.tol = target, probes, signature, room, tol
        self.kept: list[np.ndarray] = []
        self.images = self.requests = self.kept_requests = 0

    def predict_proba(self, images01: np.ndarray) -> np.ndarray:
        f, n, out = self.target.encode(images01), len(self.probes.q), []
        for i in range(0, len(f.q), self.room):
            q = np.concatenate([self.probes.q, f.q[i:i + self.room]])
            ans = _ask_pinned(self.target, type(f)(q, f.scale, f.zero_point, f.bits))
            ok = bool(np.abs(ans[:n] - self.signature).max() <= self.tol)
            self.kept.append(np.full(len(ans) - n, ok))
            self.requests, self.kept_requests = self.requests + 1, self.kept_requests + ok
            out.append(ans[n:])
        self.images += len(f.q)
        return np.concatenate(out)


def tag_images(budget: int, probes: int, max_batch: int) -> tuple[int, int]:
    """(images, requests) of the tagging attacker's budget: requests of ``max_batch`` queries, each
    ``probes`` of them the probes, images + probes x requests <= budget."""
    requests = -(-budget // max_batch)
    return min(budget - probes * requests, requests * (max_batch - probes)), requests


def _hand_over(oracle, inner, keep: np.ndarray, first: np.ndarray | None = None, asked: int | None = None) -> bool:
    """Give the extraction's ``oracle`` the kept (image, answer) pairs that ``inner`` collected,
    without asking the zoo again, and ``inner``'s call count and time; with none kept, every image
    (the first ``asked``: those the zoo was asked about) with ``first`` (default: the answers as
    collected). Returns whether it fell back."""
    xs, ys = inner.transfer_set()
    fallback = not keep.any()
    n = len(xs) if asked is None else asked
    x, y = (xs[:n], (ys if first is None else first)[:n]) if fallback else (xs[keep], ys[keep])
    target, oracle.target = oracle.target, _Replay(y)
    oracle(x)
    oracle.target, oracle.calls, oracle.victim_s = target, inner.calls, inner.victim_s
    return fallback


class _Replay:
    """A target that answers with given rows, in order: hands kept (image, answer) pairs to the
    extraction's oracle without asking the zoo again."""

    def __init__(self, answers: np.ndarray):
        self.answers, self.at = answers, 0

    def predict_proba(self, images01: np.ndarray) -> np.ndarray:
        out = self.answers[self.at:self.at + len(images01)]
        self.at += len(images01)
        return out


def filter_asks(share: float, most: int = MAX_FILTER_ASKS) -> int:
    """The asks an image at the pin (1..``most``) that keep the most victim answers per query when
    the victim answers a share ``share`` of the asks: argmax_R (1 - (1 - share)^R) / (R + 1); 0
    (no filtering) when it answers every ask."""
    if share >= 1:
        return 0
    s = min(max(share, 1e-3), 1.0)
    return max(range(1, most + 1), key=lambda r: (1 - (1 - s) ** r) / (r + 1))


def _mode(answers: np.ndarray, tol: float) -> tuple[np.ndarray, bool]:
    """The most frequent of (v, K) answers (first asked on ties), and whether all v were one."""
    counts = [int((np.abs(answers - a).max(1) <= tol).sum()) for a in answers]
    return answers[int(np.argmax(counts))], counts[0] == len(answers)


def _runs(points: list[tuple[float, int]], lo: float, hi: float) -> list[tuple[float, float, int]]:
    """Sorted (x, outcome) points -> runs of one outcome; a boundary is the midpoint of its neighbours."""
    runs: list[list] = []
    for i, (x, c) in enumerate(points):
        if runs and runs[-1][2] == c:
            continue
        start = lo if i == 0 else (points[i - 1][0] + x) / 2
        if runs:
            runs[-1][1] = start
        runs.append([start, hi, c])
    return [tuple(r) for r in runs]


def _band_of(bands: list[tuple[float, float, int]], a: float) -> int:
    for lo, hi, c in bands:
        if lo <= a <= hi:
            return c
    return bands[-1][2] if a > bands[-1][1] else bands[0][2]


def fingerprint(target: Any, probes01: np.ndarray, cfg: FingerprintConfig, feats=None) -> dict[str, Any]:
    """Map the zoo's target space with the probe images (``feats``: their features, encoded once,
    else encoded here); returns the pinned targets and the map, and under ``victim_signature`` the
    victim's answers to the probes (an array: not for the JSON record)."""
    from qdefend.attacks.zoo import Refused

    feats = target.encode(probes01) if feats is None else feats

    def ask(targets):
        try:
            return target.ask(feats, targets)
        except Refused:
            return None

    fp = Fingerprinter(ask, len(probes01), tol=cfg.signature_tol, repeats=cfg.repeats,
                       limit=cfg.max_fingerprint_queries)
    (a_lo, a_hi), (l_lo, l_hi) = cfg.accuracy_range, cfg.latency_range_ms
    bands = fp.accuracy_bands(a_lo, a_hi, cfg.accuracy_steps, l_hi, cfg.accuracy_tol)
    served = [b for b in bands if b[2] != REFUSED]
    if not served:
        raise AttackError(f"the zoo refused every accuracy target in {cfg.accuracy_range}: lower "
                          "--set accuracy_range=[lo,hi]")
    fp.repeats, kept = 1, fp.repeats
    top = max(served[-1][1] - cfg.accuracy_tol, served[-1][0])
    for _ in range(cfg.pin_repeats):  # single asks at the top of the served range: a rarer model shows there
        fp.outcome(top, l_hi)
    victim, lo, hi = _victim(fp, served, l_hi)
    candidates = [(lo + hi) / 2, lo + 0.75 * (hi - lo), max(hi - cfg.accuracy_tol, (lo + hi) / 2)]
    steady = []
    if cfg.pin == "steady":
        steady = [sum(fp.outcome(a, l_hi) == victim for _ in range(cfg.pin_repeats)) for a in candidates]
    fp.repeats = kept
    pin_acc = candidates[int(np.argmax(steady))] if steady else candidates[0]
    runs = fp.latency_runs(pin_acc, l_lo, l_hi, cfg.latency_steps)
    mine = [r for r in runs if r[2] == victim]
    seen = [lat for a, lat, c in fp.seen if a == pin_acc and c == victim]
    run = mine[-1] if mine else (min(seen), max(seen), victim) if seen else (l_lo, l_hi, victim)
    pin_lat = math.sqrt(run[0] * run[1])
    reference = _reference(fp, served, victim, lo, hi, pin_acc, l_hi, cfg) if cfg.filter else None
    out = {"pinned": {"accuracy": pin_acc, "latency_ms": pin_lat}, "victim_cluster": victim, "reference": reference,
           "pin_candidates": [{"accuracy": a, "victim_answers": k, "of": cfg.pin_repeats}
                              for a, k in zip(candidates, steady)],
           "clusters": len(fp.signatures), "refusals_seen": any(c == REFUSED for *_, c in fp.log),
           "accuracy_bands": [{"from": a, "to": b, "cluster": c} for a, b, c in bands],
           "latency_runs": [{"from": a, "to": b, "cluster": c} for a, b, c in runs],
           "targets_asked": len(fp.log), "queries": fp.queries, "victim_signature": fp.signatures[victim]}
    if getattr(target, "truth", None) is not None:
        out.update(_score(target, feats, fp, bands, victim, l_hi, cfg, (reference or {}).get("cluster")))
    return out


def _reference(fp: Fingerprinter, served, victim: int, lo: float, hi: float, pin_acc: float, loose: float,
               cfg: FingerprintConfig) -> dict[str, Any] | None:
    """The filtering attacker's reference model and pin (see the module docstring), the victim's
    share at the pin and the asks an image; None when no other model was ever seen."""
    near = Counter(c for a, lat, c in fp.seen if lo <= a <= hi and c not in (victim, REFUSED))
    below = [c for b_lo, b_hi, c in served if c != victim and b_hi <= lo + cfg.accuracy_tol]
    ref = near.most_common(1)[0][0] if near else below[-1] if below else None
    at_pin = [c for a, lat, c in fp.seen if a == pin_acc]  # the pin candidates' and the latency scan's asks
    share = float(np.mean([c == victim for c in at_pin]))
    if cfg.filter == "auto":
        asks = filter_asks(share)
    elif cfg.filter == "seq":  # the most asks an image; none when the victim answered every ask
        asks = MAX_SEQ_ASKS if share < 1 else 0
    else:
        asks = int(cfg.filter)
    out = {"victim_share_at_pin": share, "pin_asks_seen": len(at_pin), "asks": asks, "auto": cfg.filter == "auto",
           "sequential": cfg.filter == "seq", "cluster": ref}
    if ref is None or asks == 0:
        return {**out, "asks": 0}
    sightings: dict[float, list[int]] = {}
    for a, lat, c in fp.seen:
        if lat == loose:
            sightings.setdefault(a, []).append(c)
    accs = sorted(sightings)
    score = [float(np.mean([c == ref for c in sightings[a]])) for a in accs]
    best = max(score)
    if best == 0:  # seen only at tighter latencies: no pin to compare against
        return {**out, "asks": 0}
    runs: list[list[float]] = [[]]
    for a, v in zip(accs, score):  # runs of consecutive asked accuracies at the best share
        if v == best:
            runs[-1].append(a)
        elif runs[-1]:
            runs.append([])
    longest = max(runs, key=len)
    ref_acc = longest[(len(longest) - 1) // 2]
    fp.repeats, kept = 1, fp.repeats
    check = [fp.outcome(ref_acc, loose) == ref for _ in range(cfg.pin_repeats)]
    fp.repeats = kept
    return {**out, "accuracy": ref_acc, "latency_ms": loose, "share_in_map": best,
            "reference_answers": int(sum(check)), "of": len(check)}


def _victim(fp: Fingerprinter, served: list[tuple[float, float, int]], loose: float) -> tuple[int, float, float]:
    """(victim, lo, hi): the model answering only the most demanding accuracy targets, and the
    targets to pin it in. Under a cheapest-first policy a model is the answer from the next lower
    model's accuracy up to its own, so the most accurate one is the model whose *lowest* sighting
    (any single ask at the loosest latency) is highest; counting single asks, not majorities,
    still finds it where target noise leaves it a minority of the answers. Its targets run from
    that sighting to the top of the served range (ties: the highest majority band's model)."""
    lowest: dict[int, float] = {}
    for a, lat, c in fp.seen:
        if c != REFUSED and lat == loose:
            lowest[c] = min(a, lowest.get(c, a))
    top_lo, top_hi, top = served[-1]
    victim = max(lowest, key=lambda c: (lowest[c], c == top))
    return victim, (top_lo if victim == top else lowest[victim]), top_hi


def _score(target, feats, fp: Fingerprinter, bands, victim: int, loose: float, cfg,
           ref: int | None = None) -> dict[str, Any]:
    """Identification figures against the operator's truth (the zoo's noise-free policy)."""
    truth = target.truth
    answers = [truth.probabilities(m, feats.q, feats.scale, feats.zero_point, target.sha256)
               for m in range(len(truth.names))]
    member = {REFUSED: None}
    for k, s in enumerate(fp.signatures):
        match = [m for m, p in enumerate(answers) if np.abs(p - s).max() <= cfg.signature_tol]
        member[k] = match[0] if match else "unknown"
    grid = np.linspace(*cfg.accuracy_range, 201)
    hits = [member[_band_of(bands, float(a))] == truth.selected(float(a), loose) for a in grid]
    return {"identification_acc": float(np.mean(hits)), "victim_member": member[victim],
            "reference_member": None if ref is None or member[ref] in (None, "unknown") else truth.names[member[ref]],
            "victim_identified": member[victim] == truth.most_accurate,
            "cluster_members": {str(k): (None if v is None else v if v == "unknown" else truth.names[v])
                                for k, v in member.items() if k != REFUSED}}


class FingerprintAttack(KnockoffAttack):
    """PSML: fingerprint a served model zoo's target -> model map, pin its best model, KnockoffNets it."""

    name = "fingerprint"
    requires = frozenset({"probabilities"})
    config_cls = FingerprintConfig
    alternative = "knockoff (a single service)"
    presets = {"quick": {**QUICK, "probes": 8, "accuracy_steps": 6, "latency_steps": 4}}

    def check(self, target):
        super().check(target)
        if target.kind != "zoo":
            raise AttackError(f"attack 'fingerprint' needs a served model zoo; target '{target.name}' is a "
                              f"{target.kind}: pass --artifact zoo:http://127.0.0.1:PORT, or use --attack knockoff")

    def collect(self, oracle, pool, ctx):
        cfg, target = self.config, oracle.target
        if cfg.mode == "naive":
            (a_lo, a_hi), (l_lo, l_hi) = cfg.accuracy_range, cfg.latency_range_ms
            rng = np.random.default_rng(ctx.seed + 7)
            target.sampler = lambda: (float(rng.uniform(a_lo, a_hi)), float(math.exp(rng.uniform(math.log(l_lo),
                                                                                                  math.log(l_hi)))))
            info = super().collect(oracle, pool, ctx)
            return {**info, "mode": "naive", "notes": [
                "naive: each request carried targets drawn uniformly from the target box (log-uniform latency), "
                "so answers came from whichever models those targets select"]}
        n = min(cfg.probes, len(pool))
        probes = target.encode(pool.x[:n])
        fp = fingerprint(target, pool.x[:n], cfg, feats=probes)
        signature = fp.pop("victim_signature")
        target.targets = (fp["pinned"]["accuracy"], fp["pinned"]["latency_ms"])
        ctx.say(f"fingerprint: {fp['clusters']} models seen in {fp['queries']} queries; pinned accuracy "
                f"{target.targets[0]:.4f}, latency {target.targets[1]:.3g} ms")
        if cfg.tag:
            return self._tagged(oracle, pool, ctx, fp, probes, signature)
        ref = fp.get("reference")
        if ref and ref["asks"]:
            return self._filtered(oracle, pool, ctx, fp, ref)
        if cfg.vote == 1:
            info = {**super().collect(oracle, pool, ctx), "mode": "fingerprint", "fingerprint": fp}
            if ref:  # filter asked for, nothing to filter
                why = ("the victim answered every ask at the pin" if ref["victim_share_at_pin"] >= 1 else
                       "no other model was seen to compare against")
                info["filter"] = {**ref, "images": oracle.used, "queries": oracle.used, "kept": oracle.used,
                                  "kept_share": 1.0, "fallback": False}
                info["notes"] = [*info.get("notes", []), f"filter: not used ({why}); every answer at the pin kept"]
            return info
        voter = MajorityVote(target, cfg.vote, cfg.signature_tol)
        oracle.target, oracle.budget = voter, oracle.budget // cfg.vote  # every ask is paid for
        info = super().collect(oracle, pool, ctx)
        vote = {"votes": cfg.vote, "images": voter.images, "asks": voter.images * cfg.vote,
                "split_share": voter.split / max(voter.images, 1)}
        return {**info, "mode": "fingerprint", "fingerprint": fp, "vote": vote, "notes": [
            *info.get("notes", []), f"vote: each of {voter.images} images asked {cfg.vote} times at the pin, "
            f"its most frequent answer kept; {100 * vote['split_share']:.1f}% of them got differing answers"]}

    def _filtered(self, oracle, pool, ctx, fp, ref):
        """The filtering attacker's extraction (see the module docstring): KnockoffNets' query
        policy on budget // (asks + 1) images through a :class:`ReferenceFilter`, then the kept
        (image, answer) pairs are handed to the extraction's oracle, which the clone trains on."""
        from .common import QueryOracle

        target, asks, seq = oracle.target, ref["asks"], ref.get("sequential", False)
        images = oracle.budget if seq else oracle.budget // (asks + 1)  # seq: as many as the budget lasts
        if images < 1 or (seq and oracle.budget < 2):
            raise AttackError(f"fingerprint.filter: {'2' if seq else asks + 1} asks an image (with the reference) "
                              f"exceed the budget {oracle.budget}: raise --set budgets=... or set filter lower")
        pins = (ref["accuracy"], ref["latency_ms"])
        tol = self.config.signature_tol
        filt = (SequentialFilter(target, asks, pins, tol, oracle.budget) if seq else
                ReferenceFilter(target, asks, pins, tol))
        inner = QueryOracle(filt, "probabilities", images, oracle.num_classes, oracle.batch)
        info = super().collect(inner, pool, ctx)
        keep = np.concatenate(filt.kept)
        fallback = _hand_over(oracle, inner, keep, np.concatenate(filt.first), filt.images)
        queries = filt.spent if seq else filt.images * (asks + 1)
        out = {**ref, "images": filt.images, "queries": queries, "kept": int(keep.sum()),
               "kept_share": float(keep[:filt.images].mean()) if filt.images else 0.0, "fallback": fallback}
        how = (f"1 reference ask, then up to {asks} at the pin until one differs ({queries} asks)" if seq
               else f"{asks} + 1 reference asks")
        ctx.say(f"filter: {filt.images} images x ({how}); {out['kept']} answers differ from the reference model's"
                + (" (none: training on the first answers at the pin)" if fallback else ""))
        each = (f"asked once at the reference pin (accuracy {ref['accuracy']:.4f}), then at the pin until an answer "
                f"differed, up to {asks} times ({queries} asks in all)" if seq else
                f"asked {asks} times at the pin and once at the reference pin (accuracy {ref['accuracy']:.4f})")
        note = (f"filter: each of {filt.images} images {each}; {out['kept']} kept (their answer differs from the "
                "reference model's)" + ("; none did, so the clone trained on every image's first answer at the pin"
                                        if fallback else ""))
        return {**info, "mode": "fingerprint", "fingerprint": fp, "filter": out,
                "notes": [*info.get("notes", []), note]}

    def _tagged(self, oracle, pool, ctx, fp, probes, signature):
        """The tagging attacker's extraction (see the module docstring): KnockoffNets' random policy
        through a :class:`ProbeTag`, then the kept (image, answer) pairs go to the extraction's oracle."""
        from .common import QueryOracle

        target, n = oracle.target, len(probes.q)
        max_batch = target.max_batch
        if n >= max_batch:
            raise AttackError(f"fingerprint.tag: {n} probes fill the zoo's batch of {max_batch}: lower --set probes=")
        images, _ = tag_images(oracle.budget, n, max_batch)
        if images < 1:
            raise AttackError(f"fingerprint.tag: the budget {oracle.budget} does not cover one request of {n} probes "
                              "and an image: raise --set budgets=...")
        tag = ProbeTag(target, probes, signature, max_batch - n, self.config.signature_tol)
        inner = QueryOracle(tag, "probabilities", images, oracle.num_classes, max_batch - n)
        info = super().collect(inner, pool, ctx)
        keep = np.concatenate(tag.kept)
        fallback = _hand_over(oracle, inner, keep)
        out = {"probes": n, "requests": tag.requests, "kept_requests": tag.kept_requests, "images": tag.images,
               "queries": tag.images + n * tag.requests, "kept": int(keep.sum()), "kept_share": float(keep.mean()),
               "fallback": fallback}
        ctx.say(f"tag: {tag.requests} requests of {n} probes + up to {max_batch - n} images; the victim answered "
                f"{tag.kept_requests} ({out['kept']} images kept)" + (" (none: training on every answer)"
                                                                      if fallback else ""))
        note = (f"tag: {tag.requests} requests carried the {n} probes; {tag.kept_requests} came back with the "
                f"victim's signature, {out['kept']} images kept" + ("; none did, so the clone trained on every answer"
                                                                    if fallback else ""))
        return {**info, "mode": "fingerprint", "fingerprint": fp, "tag": out, "notes": [*info.get("notes", []), note]}

    def _run(self, target, data, seed, say):
        res = super()._run(target, data, seed, say)
        fp = res.extra.get("fingerprint")
        res.metrics["fingerprint_queries"] = float(fp["queries"]) if fp else 0.0
        vote = res.extra.get("vote")
        if vote:  # the oracle counted images; every ask of them is a query
            res.metrics["queries"] = float(vote["asks"])
            res.metrics["vote_split_share"] = vote["split_share"]
        filt = res.extra.get("filter")
        if filt:  # the oracle counted the kept answers; every ask of every image is a query
            res.metrics["queries"] = float(filt["queries"])
            res.metrics["filter_kept"] = float(filt["kept"])
        tag = res.extra.get("tag")
        if tag:  # the oracle counted the kept images; every image and probe sent is a query
            res.metrics["queries"] = float(tag["queries"])
            res.metrics["tag_kept"] = float(tag["kept"])
        if fp and "identification_acc" in fp:
            res.metrics["identification_acc"] = fp["identification_acc"]
            res.metrics["victim_identified"] = float(fp["victim_identified"])
        if getattr(target, "truth", None) is not None:
            res.extra["fidelity_to"] = target.truth.names[target.truth.most_accurate]
        return res


ATTACKS.register(help="PSML: fingerprint a served model zoo (zoo:URL), pin its best model, KnockoffNets it")(
    FingerprintAttack)
