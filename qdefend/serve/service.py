"""What ``qdefend serve`` does for one request, without a web framework: check it, run the head.

A :class:`Service` opens an exported run through its manifest (every artifact's sha256 checked
before it is loaded), runs its cloud head (``head.int8.onnx`` or ``head.float.onnx``) in ONNX
Runtime, and checks each features message against the manifest: dtype, shape, the wire grid
(scale / zero point) and the sha256 of the encoder the device declares. A mismatch is a
:class:`RequestError` with an HTTP status and a one-line reason saying what the client must do.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdefend.checks import check_choice, check_number
from qdefend.edge.errors import ArtifactError
from qdefend.edge.manifest import load_manifest
from qdefend.edge.release import wire_bits, wire_dequantize
from qdefend.edge.runtime import Runtime
from qdefend.edge import wire
from qdefend.edge.wire import Message, describe_grid, same_grid
from qdefend.errors import QdefendError

__all__ = ["HEADS", "ServeConfig", "RequestError", "Service", "client_manifest", "open_service"]

HEADS = {"int8": "head.int8.onnx", "float": "head.float.onnx"}
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and a one-line `reason` (sent to the client)."""

    def __init__(self, status: int, reason: str, kind: str):
        super().__init__(reason)
        self.status, self.reason, self.kind = status, reason, kind  # kind: the rejects metric's label


@dataclass
class ServeConfig:
    """``qdefend serve`` settings (flags of the same names)."""

    run: str = "runs/demo"
    head: str = "int8"
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int = 1  # ONNX Runtime intra-op threads per worker (requests run concurrently in a pool)
    max_batch: int = 256
    token_file: str | None = None
    insecure_no_auth: bool = False
    allow_origins: list[str] = field(default_factory=list)  # CORS, for a phone-web bundle served elsewhere
    web_runtime: str | None = None  # folder holding onnxruntime-web's dist files (default: the npm install)
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    zoo: list[str] = field(default_factory=list)  # --zoo: member runs RUN[:HEAD] (qdefend.serve.zoo)
    target_noise: str | None = None  # --target-noise DIST:ACC[,LAT], the zoo's defense
    zoo_seed: int | None = None  # seed of the target noise
    latency_resolution_ms: float = 0.25  # zoo latency profiles are rounded up to this

    def __post_init__(self):
        check_choice(self.head, "--head", tuple(HEADS))
        check_number(self.port, "--port", lo=0, hi=65535, integer=True, fix="--port 8000")
        check_number(self.workers, "--workers", lo=1, hi=64, integer=True, fix="--workers 2")
        check_number(self.threads, "--threads", lo=1, hi=256, integer=True, fix="--threads 1")
        check_number(self.max_batch, "--max-batch", lo=1, hi=65536, integer=True, fix="--max-batch 256")
        if self.insecure_no_auth and self.token_file:
            raise QdefendError("--insecure-no-auth and --token-file contradict each other: pass one of them")
        if self.insecure_no_auth and self.host not in LOOPBACK:
            raise QdefendError(f"--insecure-no-auth is allowed on loopback only (127.0.0.1, ::1), not --host "
                               f"{self.host}: pass --token-file FILE to serve on the network")
        if not self.insecure_no_auth and not self.token_file:
            raise QdefendError("qdefend serve needs a bearer token: pass --token-file FILE (one line, e.g. from "
                               "`openssl rand -hex 32 > token.txt`), or --insecure-no-auth on 127.0.0.1")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise QdefendError("--ssl-certfile and --ssl-keyfile go together: pass both (or neither)")
        if self.zoo and self.workers != 1:
            raise QdefendError(f"--zoo serves from one process (its goodput and target noise are per process), "
                               f"not --workers {self.workers}: drop --workers")
        if not self.zoo and self.target_noise:
            raise QdefendError("--target-noise perturbs a zoo's targets: add --zoo and the member runs")
        if self.zoo:
            from .zoo import TargetNoise

            TargetNoise.parse(self.target_noise)
            check_number(self.latency_resolution_ms, "--latency-resolution-ms", lo=0, lo_open=True,
                         fix="--latency-resolution-ms 0.25")

    def read_token(self) -> str | None:
        """The bearer token, or None without auth; a missing, empty or multi-line file is refused."""
        if self.insecure_no_auth:
            return None
        path = Path(self.token_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QdefendError(f"cannot read --token-file {path} ({e.__class__.__name__}): write the token "
                               "there, e.g. `openssl rand -hex 32 > token.txt`") from None
        token = text.strip()
        if not token or any(c.isspace() for c in token) or len(token) < 16:
            raise QdefendError(f"--token-file {path} must hold one token of >= 16 characters without spaces, "
                               "e.g. `openssl rand -hex 32 > token.txt`")
        return token


def open_service(cfg: ServeConfig):
    """The :class:`Service` of ``cfg.run``, or with ``cfg.zoo`` a :class:`qdefend.serve.zoo.ZooService`."""
    if not cfg.zoo:
        return Service(cfg.run, head=cfg.head, threads=cfg.threads, max_batch=cfg.max_batch)
    from .zoo import TargetNoise, ZooService

    return ZooService(list(cfg.zoo), head=cfg.head, threads=cfg.threads, max_batch=cfg.max_batch,
                      noise=TargetNoise.parse(cfg.target_noise), seed=cfg.zoo_seed,
                      latency_resolution_ms=cfg.latency_resolution_ms)


def client_manifest(manifest: dict, head: str | None = None, max_batch: int | None = None) -> dict[str, Any]:
    """What a client must run, from a run's manifest: the encoders (sha256, tensors), input
    normalisation, release steps and wire grid; the head and limits when a server decides them."""
    m = manifest
    encoders = {name: {k: e[k] for k in ("sha256", "size_bytes", "format", "precision", "input", "output")}
                for name, e in m["artifacts"].items() if e["role"] == "encoder"}
    return {"schema": "qdefend.serve.manifest", "run": m.get("run"), "dataset": m["dataset"],
            "input": m["input"], "release": m["release"], "features": m["features"], "encoders": encoders,
            "head": {"artifact": head, "sha256": m["artifacts"][head]["sha256"]} if head else None,
            "limits": {"max_batch": max_batch} if max_batch else None,
            "wire_format": {"binary": wire.BINARY_TYPE, "json": wire.JSON_TYPE,
                            "doc": "qdefend.edge.wire (README: Serving)"}}


class Service:
    """One run's head behind the manifest's checks. Thread-safe: ONNX Runtime sessions are."""

    def __init__(self, run_dir: str | os.PathLike, head: str = "int8", threads: int = 1, max_batch: int = 256):
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "manifest.json").is_file():
            raise QdefendError(f"{self.run_dir} has no manifest.json: export it first with "
                               f"`qdefend export {self.run_dir}`")
        self.manifest = load_manifest(self.run_dir)
        if self.manifest.get("verification", {}).get("status") != "verified":
            raise QdefendError(f"{self.run_dir}'s export was not verified: rerun `qdefend export {self.run_dir}`")
        self.head_name = HEADS[head]
        if self.head_name not in self.manifest["artifacts"]:
            raise QdefendError(f"{self.run_dir} has no {self.head_name}: re-export it with `qdefend export "
                               f"{self.run_dir}`")
        try:
            self.head = Runtime.open(self.run_dir, self.head_name, threads=threads)
        except ArtifactError as e:
            raise QdefendError(f"cannot open {self.head_name}: {e}") from None
        self.max_batch = max_batch
        self.feature_shape = list(self.manifest["features"]["shape"])
        self.wire = self.manifest["features"]["wire"]
        self.encoders = {e["sha256"]: name for name, e in self.manifest["artifacts"].items() if e["role"] == "encoder"}
        self.class_names = list(self.manifest["dataset"].get("class_names") or
                                [str(i) for i in range(self.manifest["dataset"]["num_classes"])])
        self.started = time.time()
        self._reference: dict | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what a client must run

    def client_manifest(self) -> dict[str, Any]:
        """``GET /v1/manifest``: everything a client needs to produce valid features."""
        return client_manifest(self.manifest, self.head_name, self.max_batch)

    def encoder_path(self, name: str) -> Path:
        """The verified file of encoder artifact `name` (for the browser page)."""
        entry = self.manifest["artifacts"].get(name)
        if entry is None or entry["role"] != "encoder":
            names = ", ".join(sorted(n for n, e in self.manifest["artifacts"].items() if e["role"] == "encoder"))
            raise RequestError(404, f"no encoder artifact {name!r} in this run; it has {names}", "not_found")
        return self.run_dir / entry["path"]

    def reference(self) -> dict[str, Any]:
        """``GET /v1/reference``: a few images and the int8 features (release off) this server's own
        runtime computes for them, so any client can check its encoder bit for bit."""
        with self._lock:
            if self._reference is None:
                from qdefend.data import reference_images

                name = "encoder.int8.onnx" if "encoder.int8.onnx" in self.manifest["artifacts"] else next(
                    n for n, e in self.manifest["artifacts"].items() if e["role"] == "encoder")
                images, source = reference_images(self.run_dir, self.manifest["input"]["shape"])
                f = Runtime.open(self.run_dir, name, threads=1).encode(images, release=False)
                self._reference = {"artifact": name, "source": source, "shape": list(images.shape),
                                   "images": images.reshape(-1).tolist(), "features_shape": list(f.shape),
                                   "features": f.q.reshape(-1).tolist(), "scale": f.scale,
                                   "zero_point": f.zero_point, "bits": f.bits}
            return self._reference

    # ------------------------------------------------------------------ one request

    def check(self, msg: Message) -> None:
        """Refuse a message the head must not see, with what the client must change."""
        want = self.feature_shape
        if msg.shape[1:] != want:
            raise RequestError(422, f"features shape {msg.shape} does not match this run's [N, "
                                    f"{', '.join(map(str, want))}]: encode with the run's encoder (GET /v1/manifest)",
                               "shape")
        n = msg.shape[0]
        if not 1 <= n <= self.max_batch:
            raise RequestError(413 if n > self.max_batch else 422,
                               f"batch of {n} is outside 1..{self.max_batch}: send at most {self.max_batch} "
                               "samples a request", "batch")
        if not same_grid(msg, self.wire):
            raise RequestError(422, f"features grid ({describe_grid(msg.bits, msg.scale, msg.zero_point)}) differs "
                                    f"from the manifest's wire ({describe_grid(wire_bits(self.wire), self.wire['scale'], self.wire['zero_point'])}): "
                                    "quantise with features.wire of GET /v1/manifest", "grid")
        if msg.encoder_sha256 not in self.encoders:
            accepted = ", ".join(f"{name} {sha[:12]}" for sha, name in sorted(self.encoders.items(),
                                                                              key=lambda kv: kv[1]))
            raise RequestError(409, f"features come from encoder sha256 {msg.encoder_sha256[:12]}..., which this run "
                                    f"did not export (it takes {accepted}): update the device's bundle", "encoder")

    def infer(self, msg: Message) -> dict[str, Any]:
        """Check `msg`, run the head on its dequantised features: labels, class names, probabilities."""
        self.check(msg)
        z = wire_dequantize(msg.q, self.wire)
        logits = self.head.run(z).astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        labels = p.argmax(1)
        return {"labels": labels.tolist(), "classes": [self.class_names[i] for i in labels],
                "probabilities": np.round(p, 6).tolist(), "encoder": self.encoders[msg.encoder_sha256],
                "head": self.head_name}
