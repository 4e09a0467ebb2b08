"""Model-zoo serving without a web framework: profiles, the selection policy, target noise, goodput.

``qdefend serve --zoo RUN[:HEAD] ...`` hosts several cloud heads behind one endpoint. Every member
is an exported run whose head reads the *same* released int8 features: all members must export an
encoder with the same sha256, feature shape and wire grid (head-only fine-tunes of one base run,
``qdefend train --from BASE --set train.freeze=encoder``, export byte-identical encoders). The
device encodes once, before anyone knows which head will answer, so the split-inference contract
is unchanged; only the cloud picks the head.

Each request may carry performance targets (headers ``X-Qdefend-Accuracy``, a fraction in [0, 1],
and ``X-Qdefend-Latency-Ms``, > 0). The :class:`SelectionPolicy` picks the *cheapest* member
meeting both, as model-less serving systems do (INFaaS):

* profile: accuracy = the head's test accuracy from the member's manifest (export verification);
  latency = the 25th percentile of 50 timings of the service's whole per-request path (checks,
  dequantisation, head, softmax) on one sample, measured when the server starts (a low percentile:
  the head's own cost, not the load of the moment) and rounded *up* to ``latency_resolution_ms``
  (default 0.25 ms), so heads of one architecture cost the same. A profile sitting just under a
  rounding step could land on either side of it and reorder the zoo: the server prints the
  profiles when it starts, and the resolution should leave headroom above them;
* cost order: lower profiled latency first, then lower accuracy (of two equally fast heads the less
  accurate is the cheaper to give away: a zoo keeps its best model for the requests that need it);
* no member meets both: the fastest member meeting the accuracy target (latency is best effort);
  no member meets the accuracy target: the request is refused (422), since no answer can meet it.
  A request without targets gets the cheapest member.

Defense (PSML): :class:`TargetNoise` perturbs the requested targets inside the policy before it
selects (accuracy: additive, in accuracy units; latency: multiplicative), so that the map from
requested targets to models is blurred for a fingerprinting attacker. A noisy target that no
member meets falls back to the clean targets, and refusal is decided on the clean targets: noise
never refuses a request the zoo can serve, nor serves one it cannot. Three distributions:
``gaussian`` and ``uniform`` (the paper's kind: a continuous eps per request, scale = std or
half-width) and ``drop`` (``drop:P[,TO]``), a two-point one: with probability P an accuracy target
above TO is lowered to TO, else it is left alone; targets at or below TO never move. TO defaults
to the second-highest member accuracy, so a drop sends a request for the best member to the next
one. Why ``drop``: an attacker pins the victim's band where noise moves it least (its upper end),
while users' targets spread over every band. A continuous eps spends most of its draws on small
moves, which miss the targets of users near every band's lower edge and never move a target at
the upper end of the victim's band; ``drop`` spends every draw on moving a request for the
protected members (those above TO) to the member at TO, wherever in their bands it asks, and no
draw on anyone else (raising a target would cost no goodput either: a more accurate member still
meets it, but it never moves the attacker off the best member).

A draw is made per request (default) or, with the spec's ``/image`` suffix (``drop:0.85/image``),
per image: each image of a request is then answered by the member its own draw picks, as if each
were its own query (PSML's queries are single inputs; a request batching several is the client's
choice). Per request, every image of a request shares one member, and an attacker that sends
known probe images along with its queries learns from their answers which member answered the rest
(the tagging attacker, ``qdefend.attacks.extraction.fingerprint``); per image, it cannot.

Goodput (:class:`Goodput`) = the share of requests carrying targets that were answered within
their latency target (server time from the request's arrival at the handler to its answer) by a
model meeting their accuracy target; refused requests count as missed.

Paper: Sanyal et al., "Pareto-Secure Machine Learning (PSML): Fingerprinting and Securing Inference
Serving Systems", arXiv 2307.01292 (model zoo selection by accuracy/latency targets, fingerprinting,
noise on the targets as the defense). INFaaS: Romero et al., USENIX ATC 2021.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdefend.checks import check_choice, check_number
from qdefend.edge import wire
from qdefend.edge.release import wire_bits, wire_quantize, wire_with_defaults
from qdefend.edge.wire import Message
from qdefend.errors import QdefendError

from .service import HEADS, RequestError, Service, client_manifest

__all__ = ["ACCURACY_HEADER", "LATENCY_HEADER", "Profile", "Targets", "TargetNoise", "SelectionPolicy",
           "Goodput", "ZooService", "ZooEvaluator", "parse_member", "parse_targets"]

ACCURACY_HEADER = "X-Qdefend-Accuracy"
LATENCY_HEADER = "X-Qdefend-Latency-Ms"
NOISE_DISTS = ("gaussian", "uniform", "drop")
NOISE_PER = ("request", "image")  # target noise drawn once per request, or once per image of it


@dataclass(frozen=True)
class Targets:
    """What a request asks for: accuracy in [0, 1] and latency in ms (inf: no latency target)."""

    accuracy: float = 0.0
    latency_ms: float = math.inf
    given: bool = False  # False: the request carried no target (not counted in goodput)


def parse_targets(accuracy: str | None, latency_ms: str | None) -> Targets:
    """Targets from the two header values (either may be absent); ValueError with a one-line fix."""
    if accuracy is None and latency_ms is None:
        return Targets()
    a, lat = 0.0, math.inf
    if accuracy is not None:
        try:
            a = float(accuracy)
        except ValueError:
            a = math.nan
        if not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise ValueError(f"{ACCURACY_HEADER} {accuracy!r} must be a fraction in [0, 1]: e.g. "
                             f"'{ACCURACY_HEADER}: 0.85'")
    if latency_ms is not None:
        try:
            lat = float(latency_ms)
        except ValueError:
            lat = math.nan
        if not (lat > 0 and not math.isnan(lat)):
            raise ValueError(f"{LATENCY_HEADER} {latency_ms!r} must be a number of milliseconds > 0: e.g. "
                             f"'{LATENCY_HEADER}: 5'")
    return Targets(a, lat, True)


def parse_member(spec: str, default_head: str = "int8") -> tuple[str, str]:
    """``RUN`` or ``RUN:int8`` / ``RUN:float`` -> (run directory, head precision)."""
    run, sep, head = spec.rpartition(":")
    if not sep or head not in HEADS or not run:
        run, head = spec, default_head
    return run, head


@dataclass
class TargetNoise:
    """Noise on the requested targets (the PSML defense). ``gaussian`` (eps of std 1) or
    ``uniform`` (eps in [-1, 1]): accuracy moves by ``accuracy`` x eps (accuracy units), latency
    is multiplied by max(0.01, 1 + ``latency`` x eps). ``drop`` (accuracy only): with probability
    ``accuracy`` an accuracy target above ``drop_to`` is lowered to it (None: to the level the
    policy passes, its second-highest member accuracy); otherwise it is unchanged."""

    dist: str = "gaussian"
    accuracy: float = 0.0
    latency: float = 0.0
    drop_to: float | None = None
    per: str = "request"  # a draw per request, or per image ("/image")

    def __post_init__(self):
        check_choice(self.dist, "--target-noise distribution", NOISE_DISTS, fix="--target-noise gaussian:0.02")
        check_choice(self.per, "--target-noise draw (the /SUFFIX)", NOISE_PER, fix="--target-noise drop:0.6/image")
        what = "probability" if self.dist == "drop" else "scale"
        check_number(self.accuracy, f"--target-noise accuracy {what}", lo=0, hi=1,
                     fix="--target-noise drop:0.6" if self.dist == "drop" else "--target-noise gaussian:0.02")
        check_number(self.latency, "--target-noise latency scale", lo=0, hi=10, fix="--target-noise gaussian:0.02,0.1")
        if self.drop_to is not None:
            check_number(self.drop_to, "--target-noise drop level TO (an accuracy)", lo=0, hi=1,
                         fix="--target-noise drop:0.6,0.77")

    @classmethod
    def parse(cls, text: str | None) -> "TargetNoise | None":
        """``gaussian:0.02`` (accuracy scale; latency 0), ``uniform:0.02,0.1`` (accuracy, latency),
        ``drop:0.6`` (probability; to the second-best member) or ``drop:0.6,0.77`` (to 0.77); a
        ``/image`` suffix draws per image, ``/request`` (the default) per request."""
        if not text:
            return None
        text, _, per = text.partition("/")
        if per and per not in NOISE_PER:
            raise QdefendError(f"--target-noise {text}/{per}: the suffix says how often the noise is drawn, "
                               f"/{' or /'.join(NOISE_PER)}: e.g. --target-noise drop:0.6/image")
        dist, _, scales = text.partition(":")
        try:
            values = [float(v) for v in scales.split(",")] if scales else []
        except ValueError:
            values = []
        if dist not in NOISE_DISTS or not 1 <= len(values) <= 2:
            raise QdefendError(f"--target-noise {text!r} must be DIST:ACCURACY_SCALE[,LATENCY_SCALE] with DIST one "
                               f"of {', '.join(NOISE_DISTS)}, or drop:PROBABILITY[,TO]: e.g. --target-noise "
                               "gaussian:0.02 or drop:0.6")
        second = values[1] if len(values) > 1 else None
        if dist == "drop":
            return cls(dist, values[0], 0.0, second, per or "request")
        return cls(dist, values[0], second or 0.0, per=per or "request")

    def spec(self) -> str:
        per = "" if self.per == "request" else f"/{self.per}"
        if self.dist == "drop":
            return f"drop:{self.accuracy:g}" + ("" if self.drop_to is None else f",{self.drop_to:g}") + per
        return f"{self.dist}:{self.accuracy:g},{self.latency:g}" + per

    def apply(self, t: Targets, rng: np.random.Generator, drop_to: float = 0.0) -> Targets:
        if self.dist == "drop":
            level = drop_to if self.drop_to is None else self.drop_to
            hit = rng.random() < self.accuracy
            return Targets(min(t.accuracy, level) if hit else t.accuracy, t.latency_ms, t.given)
        e = rng.normal(size=2) if self.dist == "gaussian" else rng.uniform(-1.0, 1.0, 2)
        lat = t.latency_ms * max(0.01, 1.0 + self.latency * e[1]) if math.isfinite(t.latency_ms) else t.latency_ms
        return Targets(t.accuracy + self.accuracy * e[0], lat, t.given)


@dataclass(frozen=True)
class Profile:
    """One zoo member as the policy sees it."""

    name: str  # "RUN:HEAD"; never sent to clients
    accuracy: float
    latency_ms: float  # rounded up to the policy's resolution
    measured_ms: float  # the raw 25th percentile


class SelectionPolicy:
    """The cheapest member meeting both targets (see the module docstring), optionally on noisy targets."""

    def __init__(self, profiles: list[Profile], noise: TargetNoise | None = None, seed: int | None = None):
        if not profiles:
            raise QdefendError("a model zoo needs at least one member: pass RUN[:HEAD] ...")
        self.profiles = list(profiles)
        self.order = sorted(range(len(profiles)), key=lambda i: (profiles[i].latency_ms, profiles[i].accuracy, i))
        self.noise = noise if noise is not None and (noise.accuracy or noise.latency) else None
        accs = sorted({p.accuracy for p in profiles})
        self.drop_to = accs[-2] if len(accs) > 1 else accs[-1]  # a ``drop``'s default level: the second best
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def select_clean(self, t: Targets) -> int | None:
        """The member for targets `t` without noise; None when none meets the accuracy target."""
        meets_acc = [i for i in self.order if self.profiles[i].accuracy >= t.accuracy]
        if not meets_acc:
            return None
        both = [i for i in meets_acc if self.profiles[i].latency_ms <= t.latency_ms]
        if both:
            return both[0]
        return min(meets_acc, key=lambda i: (self.profiles[i].latency_ms, self.profiles[i].accuracy, i))

    def select(self, t: Targets) -> int | None:
        """The member for `t`, on noisy targets when the policy has noise (falls back to clean ones).
        Whether a request is refused depends on its clean targets only."""
        clean = self.select_clean(t)
        if self.noise is None or not t.given or clean is None:
            return clean
        with self._lock:
            noisy = self.noise.apply(t, self._rng, self.drop_to)
        i = self.select_clean(noisy)
        return i if i is not None else clean

    def select_each(self, t: Targets, n: int) -> list[int | None]:
        """The member for each of `n` images of a request: one :meth:`select` for all of them, or
        one each when the noise is drawn per image."""
        if self.noise is None or self.noise.per == "request" or n == 1:
            return [self.select(t)] * n
        return [self.select(t) for _ in range(n)]

    def meets(self, i: int, t: Targets) -> bool:
        """Whether member `i`'s profiled accuracy meets the request's (clean) accuracy target."""
        return self.profiles[i].accuracy >= t.accuracy


class Goodput:
    """Thread-safe accounting of requests with targets: good, missed latency, missed accuracy, refused."""

    OUTCOMES = ("good", "missed_latency", "missed_accuracy", "refused")

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.OUTCOMES, 0)

    def outcome(self, t: Targets, accuracy_met: bool | None, elapsed_ms: float) -> str:
        if accuracy_met is None:
            return "refused"
        if not accuracy_met:
            return "missed_accuracy"
        return "good" if elapsed_ms <= t.latency_ms else "missed_latency"

    def record(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def ratio(self) -> float:
        """good / requests with targets (1.0 before any)."""
        with self._lock:
            n = sum(self.counts.values())
            return self.counts["good"] / n if n else 1.0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            c = dict(self.counts)
        n = sum(c.values())
        return {**c, "requests": n, "goodput": c["good"] / n if n else 1.0}


def _profile_latency(svc: Service, repeats: int = 50) -> float:
    """25th percentile (ms) of the service's whole per-request path on one zero-valued sample."""
    q = wire_quantize(np.zeros((1, *svc.feature_shape), np.float32), svc.wire)
    msg = Message(q, svc.wire["scale"], svc.wire["zero_point"], next(iter(svc.encoders)), wire_bits(svc.wire))
    for _ in range(5):
        svc.infer(msg)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        svc.infer(msg)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 25))


def _head_accuracy(svc: Service, spec: str) -> float:
    v = svc.manifest.get("verification", {}).get("artifacts", {}).get(svc.head_name, {})
    acc = v.get("test_acc")
    if not isinstance(acc, (int, float)) or not 0 <= acc <= 1:
        raise QdefendError(f"zoo member {spec}: its manifest records no test accuracy for {svc.head_name}: "
                           f"re-export it with `qdefend export {svc.run_dir}`")
    return float(acc)


@dataclass
class ZooService:
    """Several heads over one encoder's features behind the :class:`Service` interface the app uses."""

    members: list[str]
    head: str = "int8"
    threads: int = 1
    max_batch: int = 256
    noise: TargetNoise | None = None
    seed: int | None = None
    latency_resolution_ms: float = 0.25
    profile_repeats: int = 50
    services: list[Service] = field(init=False)

    def __post_init__(self):
        check_number(self.latency_resolution_ms, "--latency-resolution-ms", lo=0, lo_open=True,
                     fix="--latency-resolution-ms 0.25")
        specs = [parse_member(m, self.head) for m in self.members]
        names = [f"{Path(r)}:{h}" for r, h in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise QdefendError(f"zoo member {dup} is given twice: list each RUN:HEAD once")
        self.services = [Service(r, head=h, threads=self.threads, max_batch=self.max_batch) for r, h in specs]
        first = self.services[0]
        common = set(first.encoders)
        for name, s in zip(names[1:], self.services[1:]):
            if s.feature_shape != first.feature_shape or wire_with_defaults(s.wire) != wire_with_defaults(first.wire):
                raise QdefendError(f"zoo member {name} reads features {s.feature_shape} on grid {s.wire}, the first "
                                   f"member {first.feature_shape} on {first.wire}: a zoo's heads must share one "
                                   "encoder (train them with --from BASE --set train.freeze=encoder)")
            common &= set(s.encoders)
        if not common:
            raise QdefendError(f"the zoo members {', '.join(names)} export no encoder in common (sha256): a zoo's "
                               "heads must read one encoder's features (train them with --from BASE --set "
                               "train.freeze=encoder, then export)")
        self.accepted = {sha: first.encoders[sha] for sha in common}
        profiles = []
        for name, s in zip(names, self.services):
            raw = _profile_latency(s, self.profile_repeats)
            res = self.latency_resolution_ms
            profiles.append(Profile(name, _head_accuracy(s, name), round(math.ceil(raw / res) * res, 6), raw))
        self.policy = SelectionPolicy(profiles, self.noise, self.seed)
        self.goodput = Goodput()
        # what the app reads of a single-run Service
        self.run_dir, self.manifest = first.run_dir, first.manifest
        self.head_name = "zoo"
        self.feature_shape, self.wire = first.feature_shape, first.wire
        self.encoders, self.class_names = self.accepted, first.class_names
        self.started = time.time()

    # ------------------------------------------------------------------ what a client must run

    def client_manifest(self) -> dict[str, Any]:
        """The first member's encoders (those every member accepts), no head: the zoo picks it."""
        m = client_manifest(self.manifest, None, self.max_batch)
        m["encoders"] = {k: v for k, v in m["encoders"].items() if v["sha256"] in self.accepted}
        m["zoo"] = {"targets": {"accuracy": ACCURACY_HEADER, "latency_ms": LATENCY_HEADER},
                    "policy": "cheapest model meeting both targets (README: Model-zoo serving)"}
        return m

    def encoder_path(self, name: str) -> Path:
        return self.services[0].encoder_path(name)

    def reference(self) -> dict[str, Any]:
        return self.services[0].reference()

    # ------------------------------------------------------------------ one request

    def check(self, msg: Message) -> None:
        self.services[0].check(msg)
        if msg.encoder_sha256 not in self.accepted:
            raise RequestError(409, f"features come from encoder sha256 {msg.encoder_sha256[:12]}..., which not every "
                                    "head of this zoo reads: update the device's bundle", "encoder")

    def infer(self, msg: Message, targets: Targets | None = None) -> dict[str, Any]:
        """Check `msg`, pick the member for `targets` and answer with it (the member is not named);
        with noise drawn per image, each image's own member answers it. The chosen members'
        indices, one per image, are in the answer's ``_member`` (the app removes it)."""
        t = targets or Targets()
        self.check(msg)
        picks = self.policy.select_each(t, len(msg.q))
        if picks[0] is None:  # refusal depends on the clean targets only: all or none
            raise RequestError(422, f"no model of this zoo meets {ACCURACY_HEADER} {t.accuracy:g}: ask for a lower "
                                    "accuracy", "zoo_accuracy")
        members = sorted(set(picks))
        if len(members) == 1:
            res = self.services[members[0]].infer(msg)
        else:
            res = {"labels": [None] * len(picks), "classes": [None] * len(picks), "probabilities": [None] * len(picks)}
            for i in members:
                rows = [k for k, m in enumerate(picks) if m == i]
                part = self.services[i].infer(Message(msg.q[rows], msg.scale, msg.zero_point, msg.encoder_sha256,
                                                      msg.bits))
                for key in ("labels", "classes", "probabilities"):
                    for k, v in zip(rows, part[key]):
                        res[key][k] = v
                res["encoder"] = part["encoder"]
        res.pop("head", None)
        res["_member"] = picks
        return res

    def account(self, t: Targets, member: int | list[int] | None, elapsed_ms: float) -> str | None:
        """Record one answered (its member, or each image's) or refused (None) request with targets;
        returns its outcome. A request meets its accuracy target when every image's member does."""
        if not t.given:
            return None
        members = [member] if isinstance(member, int) else member
        met = None if members is None else all(self.policy.meets(i, t) for i in members)
        outcome = self.goodput.outcome(t, met, elapsed_ms)
        self.goodput.record(outcome)
        return outcome

    def describe(self) -> dict[str, Any]:
        """The operator's view (logs, benchmarks): members, profiles, order, noise. Not served."""
        return {"members": [vars(p) for p in self.policy.profiles],
                "cost_order": [self.policy.profiles[i].name for i in self.policy.order],
                "noise": self.policy.noise.spec() if self.policy.noise else None, "drop_to": self.policy.drop_to,
                "latency_resolution_ms": self.latency_resolution_ms, "goodput": self.goodput.snapshot()}


class ZooEvaluator:
    """The operator's ground truth, to score an attack on a zoo in-process (tests, benchmarks);
    never reachable over HTTP. Attacks read it only to report identification accuracy and
    fidelity against the true members."""

    def __init__(self, zoo: ZooService):
        self.zoo = zoo
        self.names = [p.name for p in zoo.policy.profiles]
        self.most_accurate = max(range(len(self.names)),
                                 key=lambda i: (zoo.policy.profiles[i].accuracy, -zoo.policy.profiles[i].latency_ms))

    def selected(self, accuracy: float, latency_ms: float = math.inf) -> int | None:
        """The member the noise-free policy picks for these targets (None: refused)."""
        return self.zoo.policy.select_clean(Targets(accuracy, latency_ms, True))

    def probabilities(self, member: int, q: np.ndarray, scale: float, zero_point: int, sha256: str) -> np.ndarray:
        """Member `member`'s probabilities for int8 features `q` (batched by the server's limit)."""
        out = []
        for i in range(0, len(q), self.zoo.max_batch):
            msg = wire.Message(q[i:i + self.zoo.max_batch], scale, zero_point, sha256, wire_bits(self.zoo.wire))
            out.append(np.asarray(self.zoo.services[member].infer(msg)["probabilities"], np.float32))
        return np.concatenate(out)
