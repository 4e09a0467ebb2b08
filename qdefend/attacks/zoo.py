"""A served model zoo (``qdefend serve --zoo``) as an attack target, over HTTP on loopback.

The attacker is a paying user: it holds a bearer token (``$QDEFEND_TOKEN``) and the device bundle,
whose encoder is public, so it encodes its own images exactly as a device would (release
transform included) and posts the int8 features with performance targets through
:class:`qdefend.edge.client.Client`. It never learns which head answered: the answer names none.

:class:`ZooTarget` answers ``predict_proba`` with the targets it is set to: ``targets`` (a fixed
(accuracy, latency_ms) pair, what a fingerprinting attacker pins), or ``sampler`` (a function
drawing targets per request, the naive attacker), or none (the server's default: its cheapest
head). Every request loop is bounded in requests and in wall time (``max_requests``,
``deadline_s``), and only loopback URLs are accepted: this is a research tool.

Scoring needs the ground truth, which only the operator has: a :class:`qdefend.serve.zoo.ZooEvaluator`
of the same in-process server (tests, ``benchmarks/psml.py``) may be handed in as ``truth``; attacks
read it only to report identification accuracy and fidelity against the true models, never to attack.

Build with :func:`open_zoo_target` (``zoo:http://127.0.0.1:PORT`` in ``qdefend attack --artifact``).
"""

from __future__ import annotations

import math
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import numpy as np

from qdefend.data import Normalization
from qdefend.edge.client import Client, ClientError
from qdefend.edge.manifest import ArtifactError
from qdefend.edge.runtime import Runtime

from .base import AttackError
from .targets import Target

__all__ = ["ZooTarget", "Refused", "open_zoo_target", "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class Refused(Exception):
    """The zoo refused the targets (HTTP 422: no model meets the accuracy asked for)."""


class ZooTarget(Target):
    """Images -> the zoo's probabilities for the current targets (see the module docstring)."""

    def __init__(self, url: str, runtime: Runtime, *, token: str | None = None, timeout: float = 30.0,
                 max_requests: int = 200_000, deadline_s: float = 3600.0, truth: Any = None, seed: int = 0):
        host = urllib.parse.urlsplit(url).hostname
        if host not in LOOPBACK_HOSTS:
            raise AttackError(f"zoo target {url}: attacks talk to loopback servers only (127.0.0.1): start "
                              "`qdefend serve --zoo ...` on this machine")
        m = runtime.manifest
        super().__init__(name=f"zoo:{url}", kind="zoo", offers={"probabilities", "labels"},
                         input_shape=m["input"]["shape"],
                         normalization=Normalization.from_dict(m["input"]["normalization"]), release=m["release"],
                         feature_shape=m["features"]["shape"], num_classes=m["dataset"].get("num_classes"),
                         notes=[f"a served model zoo at {url}, queried over HTTP with {runtime.name} features"])
        self.runtime, self.sha256 = runtime, runtime.entry["sha256"]
        self.client = Client(url, token=token, timeout=timeout)
        self.client.check_encoder(self.sha256, runtime.name)
        self.max_requests, self.deadline_s = int(max_requests), float(deadline_s)
        self.truth = truth
        self.targets: tuple[float, float] | None = None
        self.sampler: Callable[[], tuple[float, float]] | None = None
        self.requests = 0  # HTTP requests sent
        self.samples = 0  # images sent (queries)
        self._t0 = time.monotonic()
        self._rng = np.random.default_rng(seed)
        # the most images the zoo takes in one request (its manifest's limits)
        self.max_batch = int((self.client.manifest().get("limits") or {}).get("max_batch", 256))

    # ------------------------------------------------------------------ the wire

    def encode(self, images01: np.ndarray):
        """What the device sends for the images: the public encoder, release transform, int8 grid."""
        return self.runtime.encode(self._pixels(images01), rng=self._rng)

    def _post(self, q: np.ndarray, scale: float, zp: int, targets: tuple[float, float] | None) -> np.ndarray:
        if self.requests >= self.max_requests:
            raise AttackError(f"zoo target: {self.requests} requests sent, the limit (max_requests): raise it or "
                              "lower the budgets")
        if time.monotonic() - self._t0 > self.deadline_s:
            raise AttackError(f"zoo target: past its deadline of {self.deadline_s:g} s: raise deadline_s or lower "
                              "the budgets")
        from qdefend.edge.release import wire_bits
        from qdefend.edge.runtime import Features

        acc, lat = targets if targets is not None else (None, None)
        self.requests += 1
        self.samples += len(q)
        try:
            res = self.client.infer(Features(q, scale, zp, wire_bits(self.runtime.manifest["features"]["wire"])),
                                    self.sha256, batch=len(q), accuracy=acc,
                                    latency_ms=None if lat is None or math.isinf(lat) else lat)
        except ClientError as e:
            if e.status == 422 and "no model of this zoo" in str(e):
                raise Refused(str(e)) from None
            raise AttackError(f"zoo target: {e}") from None
        return np.asarray(res["probabilities"], np.float32)

    def ask(self, features, targets: tuple[float, float] | None) -> np.ndarray:
        """Probabilities for already encoded ``features`` (runtime.Features) under ``targets``, one
        request per server batch; raises :class:`Refused` when the zoo refuses the targets."""
        out = [self._post(features.q[i:i + self.max_batch], features.scale, features.zero_point, targets)
               for i in range(0, len(features.q), self.max_batch)]
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    # ------------------------------------------------------------------ the Target interface

    def _current(self) -> tuple[float, float] | None:
        return self.sampler() if self.sampler is not None else self.targets

    def predict_proba(self, images01: np.ndarray) -> np.ndarray:
        f = self.encode(images01)
        out = []
        for i in range(0, len(f.q), self.max_batch):
            chunk = type(f)(f.q[i:i + self.max_batch], f.scale, f.zero_point, f.bits)
            for _ in range(100):  # a sampled target the zoo refuses: draw again (bounded)
                try:
                    out.append(self.ask(chunk, self._current()))
                    break
                except Refused:
                    if self.sampler is None:
                        raise AttackError(f"zoo target: the zoo refuses the targets {self.targets}: pin "
                                          "reachable ones") from None
            else:
                raise AttackError("zoo target: the zoo refused 100 sampled targets in a row: narrow the target "
                                  "range (--set accuracy_range=[lo,hi])")
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    def predict_labels(self, images01: np.ndarray) -> np.ndarray:
        return self.predict_proba(images01).argmax(1).astype(np.int64)

    # ------------------------------------------------------------------ scoring (the operator's truth)

    def truth_probabilities(self, member: int, images01: np.ndarray) -> np.ndarray:
        """Member ``member``'s probabilities for the images as a device would send them (needs ``truth``)."""
        f = self.runtime.encode(self._pixels(images01), seed=0)
        return self.truth.probabilities(member, f.q, f.scale, f.zero_point, self.sha256)

    def reference_labels(self, images01: np.ndarray) -> np.ndarray:
        """The labels fidelity is measured against: with ``truth``, the zoo's most accurate model
        (the one an attacker wants); without, the zoo's answers to the current targets."""
        if self.truth is None:
            return self.predict_labels(images01)
        return self.truth_probabilities(self.truth.most_accurate, images01).argmax(1).astype(np.int64)


def open_zoo_target(run_dir: str | Path, spec: str, *, threads: int | None = None, token: str | None = None,
                    truth: Any = None, **kw: Any) -> ZooTarget:
    """``zoo:http://127.0.0.1:PORT[#ENCODER]``: the zoo at that URL, queried with the run's encoder
    artifact ENCODER (default encoder.int8.onnx; the device bundle's). Token: ``token`` or $QDEFEND_TOKEN."""
    rest = spec[len("zoo:"):]
    url, _, artifact = rest.partition("#")
    if not url.startswith(("http://", "https://")):
        raise AttackError(f"bad target '{spec}': write zoo:http://127.0.0.1:PORT (the `qdefend serve --zoo` URL)")
    try:
        rt = Runtime.open(run_dir, artifact or "encoder.int8.onnx", threads=threads)
    except ArtifactError as e:
        raise AttackError(f"zoo target: cannot open the encoder of {run_dir}: {e}") from None
    try:
        return ZooTarget(url, rt, token=token if token is not None else os.environ.get("QDEFEND_TOKEN"),
                         truth=truth, **kw)
    except ClientError as e:
        raise AttackError(f"zoo target: {e}") from None
