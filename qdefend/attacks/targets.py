"""What an attacker can attack: a torch encoder, an exported artifact, or the whole service.

A :class:`Target` says what it *offers* (a subset of ``CAPABILITIES``: released features,
gradients, probabilities, labels) and gives it through one interface, so the same attack code
runs against every kind:

* ``torch-float``  the run's encoder as trained (fake-quant QAT graph, or the float encoder):
  released features and gradients (``features_torch``) - the white-box route.
* ``torch-int8``   the converted int8 encoder (torch reference kernels): features only; the int8
  graph's rounding has no useful gradient. Its white-box twin is ``torch-float`` (``twin()``).
* ``onnxruntime`` / ``litert``  an exported artifact run by :mod:`qdefend.edge.runtime`:
  features only, exactly the bytes a device sends (``Runtime.encode``, through the binary wire
  message, bit-packed below 8 bits, and back).
* ``service``      encoder + cloud head: probabilities (and labels), or labels only.
* ``zoo``          a model zoo served by ``qdefend serve --zoo``, over HTTP on loopback
  (:mod:`qdefend.attacks.zoo`): probabilities for the performance targets the attacker sends.

Released features are ``release(encoder(x))`` put on the manifest's wire grid (int8, or 2..7 bits
per code, per tensor or per channel, in the grid's order) and read back (dequantised): what the
cloud, or anyone on the wire, sees. ``release_torch`` applies the known
release transform (noise, dropout, pruning) in torch so a noise-aware attacker can simulate it.

Build targets with :func:`open_target` (``"torch-float"``, ``"torch-int8"``, an artifact file name
such as ``"encoder.int8.tflite"``, ``"service:encoder.int8.onnx"`` or ``"zoo:http://127.0.0.1:PORT"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from qdefend.data import Normalization
from qdefend.edge.release import (random_release, release_torch_to_wire, torch_release, wire_dequantize,
                                  wire_quantize)

from .base import CAPABILITIES, AttackError
from qdefend.run import Run, RunPaths, load_run
from qdefend import quant
from qdefend.edge.manifest import ArtifactError
from qdefend.edge.runtime import Runtime

__all__ = [
    "TARGET_KINDS", "Target", "TorchTarget", "RuntimeTarget", "ServiceTarget", "open_target",
    "target_specs",
]

TARGET_KINDS = ("torch-float", "torch-int8", "onnxruntime", "litert", "service", "zoo")
TWIN_NOTE = "attacked through the fake-quant twin (the int8 graph has no useful gradient)"


# ---------------------------------------------------------------------------------------- release


def _wire(z: np.ndarray, wire: dict | None) -> np.ndarray:
    """Put float features on the wire grid and read them back (what the cloud sees)."""
    if wire is None:
        return np.asarray(z, np.float32)
    return wire_dequantize(wire_quantize(z, wire), wire)


def _as_sent(features) -> np.ndarray:
    """Device features (runtime.Features) through the binary wire message and back, dequantised:
    the bit-packed bytes a device sends, read as the cloud reads them."""
    from qdefend.edge import wire as W

    msg = W.unpack(W.pack(features.q, features.scale, features.zero_point, "0" * 64, bits=features.bits))
    return wire_dequantize(msg.q, {"scale": msg.scale, "zero_point": msg.zero_point})


# ---------------------------------------------------------------------------------------- base


class Target:
    """Base class: set the attributes below and override what ``offers`` promises."""

    name: str = "target"
    kind: str = ""
    offers: frozenset[str] = frozenset()

    def __init__(self, *, name: str, kind: str, offers, input_shape, normalization: Normalization,
                 release: dict | None, feature_shape, num_classes: int | None = None,
                 notes: list[str] | None = None, batch_size: int = 512):
        if kind not in TARGET_KINDS:
            raise ValueError(f"unknown target kind {kind!r}; valid: {', '.join(TARGET_KINDS)}")
        bad = set(offers) - set(CAPABILITIES)
        if bad:
            raise ValueError(f"unknown capabilities {sorted(bad)}; valid: {', '.join(CAPABILITIES)}")
        self.name, self.kind, self.offers = name, kind, frozenset(offers)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.normalization = normalization
        self.release = {"steps": list((release or {}).get("steps", []))}
        self.feature_shape = tuple(int(v) for v in feature_shape)
        self.num_classes = num_classes
        self.notes = list(notes or [])
        self.batch_size = batch_size
        self.wire: dict | None = None  # the wire grid released features are put on (None: float)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r}, offers={sorted(self.offers)})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "offers": [c for c in CAPABILITIES if c in self.offers],
                "input_shape": list(self.input_shape), "feature_shape": list(self.feature_shape),
                "release": self.release, "num_classes": self.num_classes, "notes": self.notes}

    # ------------------------------------------------------------------ helpers

    def _refuse(self, what: str, hint: str) -> AttackError:
        offers = ", ".join(c for c in CAPABILITIES if c in self.offers) or "nothing"
        return AttackError(f"target '{self.name}' ({self.kind}) offers {offers}, not {what}: {hint}")

    def _pixels(self, images) -> np.ndarray:
        a = np.asarray(images)
        if a.ndim != 4 or tuple(a.shape[1:]) != self.input_shape:
            raise AttackError(f"target '{self.name}' takes (N, {', '.join(map(str, self.input_shape))}) images, "
                              f"got {a.shape}: pass split.floats() of the run's data set")
        if a.dtype == np.uint8:
            return np.divide(a, 255, dtype=np.float32)
        a = np.ascontiguousarray(a, np.float32)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            raise AttackError(f"target '{self.name}' takes [0,1] pixels; got values outside: clip them "
                              "with np.clip(x, 0, 1) (do not normalise: the target normalises)")
        return a

    # ------------------------------------------------------------------ capabilities

    def features(self, images01: np.ndarray, *, release: bool = True, seed: int | None = None) -> np.ndarray:
        """Released features (N, *feature_shape) float32: dequantised wire values."""
        raise self._refuse("released features", "attack its output with an extraction attack (knockoff)")

    def features_torch(self, x01):
        """Differentiable encoder output for [0,1] pixels ``x01`` (no release noise)."""
        hint = "use --attack clone_rmle (extract then invert)"
        if self.twin() is not None:
            hint += " or attack its white-box twin (twin())"
        raise self._refuse("gradients", hint)

    def predict_proba(self, images01: np.ndarray) -> np.ndarray:
        raise self._refuse("probabilities", "attack a 'service:...' target, or use a labels-only attack (copycat)")

    def predict_labels(self, images01: np.ndarray) -> np.ndarray:
        raise self._refuse("labels", "attack a 'service:...' target")

    def release_torch(self, z, generator=None):
        """``z`` with the known release transform applied (for noise-aware attackers)."""
        return torch_release(z, self.release["steps"], generator)

    @property
    def random_release(self) -> bool:
        """Whether each query's released features carry fresh randomness (noise, dropout)."""
        return random_release(self.release["steps"])

    def encoder_output(self, images01: np.ndarray) -> np.ndarray:
        """The encoder's float output before the release transform and the wire (N, *feature_shape)."""
        raise self._refuse("encoder outputs", "attack an encoder target (an artifact or torch-float)")

    def simulate_release(self, z, generator=None):
        """Torch: ``encoder_output`` values -> what the device would send for them, with fresh
        randomness from ``generator``: the release transform, then the wire grid. A noise-aware
        attacker uses it to draw new noise every batch (as CEM's attacker does)."""
        return release_torch_to_wire(z, self.release_torch, self.wire, generator)

    def twin(self) -> "Target | None":
        """A white-box (gradients) target computing the same function, when one exists."""
        return None

    def head(self):
        """The cloud head as a torch module (eval mode), for attacks that assume a white-box cloud."""
        return None


def _generator(seed: int | None):
    import torch

    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]) if seed is None else int(seed))
    return g


# ---------------------------------------------------------------------------------------- torch


class TorchTarget(Target):
    """A torch encoder of a run (float/fake-quant: features + gradients; int8: features only)."""

    def __init__(self, encoder, *, differentiable: bool, release_fn: Callable | None = None,
                 wire: dict | None = None, run: Any = None, **kw):
        offers = {"features", "gradients"} if differentiable else {"features"}
        super().__init__(offers=offers, **kw)
        self.encoder = _eval_frozen(encoder)
        self._release_fn = release_fn
        self.wire = wire
        self.run = run
        self._twin: Target | None = None

    @classmethod
    def from_run(cls, run: Any, precision: str = "float") -> "TorchTarget":
        """``run``: a loaded :class:`qdefend.run.Run` or a run directory."""

        if precision not in ("float", "int8"):
            raise AttackError(f"precision must be 'float' or 'int8', got {precision!r}")
        if not isinstance(run, Run):
            run = load_run(run)
        steps = (run.defense.release_spec() or {"steps": []})["steps"]
        # the grid export writes into the manifest (a sigmoid encoder's int8 output grid is TFLite's fixed one)
        sigmoid_grid = {"scale": quant.SIGMOID_SCALE, "zero_point": quant.SIGMOID_ZERO_POINT}
        wire = run.wire_grid(sigmoid_grid if run.quantized and run.cfg.model.sigmoid else None)
        notes = []
        if precision == "float":
            encoder, kind = run.net.encoder, "torch-float"
            if run.quantized:
                notes.append("torch-float is the QAT encoder with fake quantization (int8 numerics, STE gradients)")
        else:
            import warnings

            with warnings.catch_warnings():  # deepcopy of exported graphs warns about pytree internals
                warnings.simplefilter("ignore", FutureWarning)
                encoder = run.converted_encoder()
            kind = "torch-int8"
        t = cls(encoder, differentiable=precision == "float", release_fn=run.defense.release, wire=wire, run=run,
                name=kind, kind=kind, input_shape=run.data.shape, normalization=run.data.normalization,
                release={"steps": steps}, feature_shape=run.z_shape, num_classes=run.data.num_classes, notes=notes)
        return t

    def _forward(self, x01):
        return self.encoder(self.normalization.apply(x01))

    def features(self, images01, *, release=True, seed=None):
        import torch

        x = self._pixels(images01)
        gen = _generator(seed)
        out = []
        with torch.no_grad():
            for i in range(0, len(x), self.batch_size):
                z = self._forward(torch.from_numpy(x[i:i + self.batch_size]))
                if release:  # on the wire already (the torch twin is bit-exact with the device's numpy)
                    z = release_torch_to_wire(z, self._release_fn or self.release_torch, self.wire, gen)
                out.append(z.float().numpy())
        z = np.concatenate(out) if out else np.zeros((0, *self.feature_shape), np.float32)
        return z if release else _wire(z, self.wire)

    def encoder_output(self, images01):
        import torch

        x = self._pixels(images01)
        with torch.no_grad():
            out = [self._forward(torch.from_numpy(x[i:i + self.batch_size])).float().numpy()
                   for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, *self.feature_shape), np.float32)

    def features_torch(self, x01):
        if "gradients" not in self.offers:
            return super().features_torch(x01)
        return self._forward(x01)

    def release_torch(self, z, generator=None):
        return self._release_fn(z, generator) if self._release_fn else super().release_torch(z, generator)

    def twin(self):
        if "gradients" in self.offers or self.run is None:
            return None
        if self._twin is None:
            self._twin = TorchTarget.from_run(self.run, "float")
        return self._twin

    def head(self):
        return None if self.run is None else _eval_frozen(self.run.net.head)


def _eval_frozen(module):
    """Eval mode (converted int8 graphs are always in eval and refuse .eval()), no parameter grads."""
    try:
        module.eval()
    except NotImplementedError:
        pass
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------- artifacts


class RuntimeTarget(Target):
    """An exported encoder artifact run by qdefend.edge.runtime: released features only."""

    def __init__(self, runtime: Any, *, run: Any = None, **kw):
        super().__init__(offers={"features"}, **kw)
        self.runtime = runtime
        self.wire = dict(runtime.manifest["features"]["wire"])
        self.run_dir = Path(runtime.run_dir)
        self._run = run
        self._twin: Target | None = None

    @classmethod
    def open(cls, run_dir, artifact: str, *, interpreter: str = "auto", threads: int | None = None,
             run: Any = None) -> "RuntimeTarget":

        try:
            rt = Runtime.open(run_dir, artifact, interpreter=interpreter, threads=threads)
        except ArtifactError as e:
            raise AttackError(f"{e}") from None
        if rt.entry["role"] != "encoder":
            raise AttackError(f"{artifact} is a {rt.entry['role']}, not an encoder: attack "
                              f"'service:ENCODER' to reach the head, e.g. service:encoder.int8.onnx")
        m = rt.manifest
        kind = "litert" if rt.entry["format"] == "tflite" else "onnxruntime"
        return cls(rt, run=run, name=artifact, kind=kind, input_shape=m["input"]["shape"],
                   normalization=Normalization.from_dict(m["input"]["normalization"]), release=m["release"],
                   feature_shape=m["features"]["shape"], num_classes=m["dataset"].get("num_classes"),
                   notes=[f"{artifact} run by {rt.interpreter_name} {rt.interpreter_version}"])

    def features(self, images01, *, release=True, seed=None):
        x = self._pixels(images01)
        return _as_sent(self.runtime.encode(x, release=release, seed=seed, batch_size=self.batch_size))

    def encoder_output(self, images01):
        return self.runtime.encoder_output(self._pixels(images01), batch_size=self.batch_size)

    def _loaded_run(self):
        if self._run is None:
            from qdefend.run import load_run

            self._run = load_run(self.run_dir)
        return self._run

    def twin(self):
        """The run's fake-quant (QAT) encoder: the artifact's weights and grids, with STE gradients."""
        if self._twin is None:
            self._twin = TorchTarget.from_run(self._loaded_run(), "float")
        return self._twin

    def head(self):
        return _eval_frozen(self._loaded_run().net.head)


# ---------------------------------------------------------------------------------------- service


class ServiceTarget(Target):
    """Encoder + cloud head as a black box answering images with probabilities or labels.

    head: a torch module (logits) or a Runtime of a head artifact (``.run(features)`` -> logits);
    it runs on the *released* features, as in deployment."""

    def __init__(self, encoder_target: Target, head: Any, output: str = "probabilities", *,
                 torch_head: Any = None, post: Any = None):
        if output not in ("probabilities", "labels"):
            raise AttackError(f"service output must be 'probabilities' or 'labels', got {output!r}")
        if "features" not in encoder_target.offers:
            raise AttackError(f"a service needs an encoder that releases features; '{encoder_target.name}' does not")
        offers = {"probabilities", "labels"} if output == "probabilities" else {"labels"}
        head_name = getattr(head, "name", None) or type(head).__name__
        super().__init__(name=f"service:{encoder_target.name}", kind="service", offers=offers,
                         input_shape=encoder_target.input_shape, normalization=encoder_target.normalization,
                         release=encoder_target.release, feature_shape=encoder_target.feature_shape,
                         num_classes=encoder_target.num_classes,
                         notes=[*encoder_target.notes, f"service head: {head_name}, answers {output}"])
        self.encoder_target, self._head, self.output = encoder_target, head, output
        self.post = post  # a qdefend.defenses.output.OutputStack applied to the probabilities (top-1 kept)
        if post is not None:
            self.notes.append(f"service output defense: {post.spec()}")
        self._torch_head = torch_head

    def _logits(self, images01, seed):
        z = self.encoder_target.features(images01, release=True, seed=seed)
        if hasattr(self._head, "run") and hasattr(self._head, "manifest"):  # a Runtime
            return self._head.run(z)
        import torch

        with torch.no_grad():
            return torch.cat([self._head.eval()(torch.from_numpy(z[i:i + self.batch_size]))
                              for i in range(0, max(len(z), 1), self.batch_size)]).float().numpy()

    def predict_proba(self, images01, *, seed: int | None = None):
        if "probabilities" not in self.offers:
            return super().predict_proba(images01)
        logits = self._logits(self._pixels(images01), seed).astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        return (p if self.post is None else self.post(p)).astype(np.float32)

    def predict_labels(self, images01, *, seed: int | None = None):
        return self._logits(self._pixels(images01), seed).argmax(axis=1).astype(np.int64)

    def head(self):
        if self._torch_head is not None:
            return _eval_frozen(self._torch_head)
        if not hasattr(self._head, "run"):
            return _eval_frozen(self._head)
        return self.encoder_target.head()


# ---------------------------------------------------------------------------------------- open


def target_specs(run_dir) -> list[str]:
    """The target specs valid for a run: torch ones always, artifact ones once exported."""
    specs = ["torch-float", "torch-int8"]
    try:
        from qdefend.edge.manifest import load_manifest

        arts = load_manifest(run_dir)["artifacts"]
        enc = [n for n, e in sorted(arts.items()) if e["role"] == "encoder"]
    except Exception:
        enc = []
    return specs + enc + [f"service:{s}" for s in specs + enc]


def open_target(run_dir, spec: str, *, run: Any = None, output: str = "probabilities",
                interpreter: str = "auto", threads: int | None = None, service_output: str | None = None) -> Target:
    """The target ``spec`` of the run at ``run_dir``.

    spec: "torch-float" | "torch-int8" | an encoder artifact file name ("encoder.int8.tflite",
    "encoder.int8.onnx", "encoder.float.onnx") | "service:" + one of those. ``run``: an already
    loaded Run of ``run_dir`` to share (loading costs seconds). ``output``: what a service
    answers, "probabilities" or "labels". A service over an artifact runs the exported float head
    (head.float.onnx) in onnxruntime; over a torch encoder, the run's torch head.
    ``service_output``: a service-side output defense applied to its probabilities, e.g. "round:2"
    (see qdefend.defenses.output); only for ``service:`` targets.
    """

    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    post = None
    if spec.startswith("zoo:"):
        if service_output:
            raise AttackError("--service-output applies to a service: "
                              "a zoo's defense is its own (qdefend serve --zoo --target-noise)")
        from .zoo import open_zoo_target

        return open_zoo_target(run_dir, spec, threads=threads)
    if service_output:
        from qdefend.defenses.output import parse_output_defense

        if not spec.startswith("service:"):
            raise AttackError(f"--service-output applies to a service's answers; target '{spec}' is not one: "
                              f"write service:{spec}")
        post = parse_output_defense(service_output)
    if spec.startswith("service:"):
        inner = spec[len("service:"):]
        if inner.startswith("service:") or not inner:
            raise AttackError(f"bad target '{spec}': write service:ENCODER, e.g. service:encoder.int8.onnx")
        enc = open_target(run_dir, inner, run=run, interpreter=interpreter, threads=threads)
        if isinstance(enc, TorchTarget):
            return ServiceTarget(enc, enc.head(), output, post=post)
        from qdefend.edge.runtime import Runtime

        try:
            head = Runtime.open(run_dir, "head.float.onnx", threads=threads)
        except Exception as e:
            raise AttackError(f"cannot open the cloud head head.float.onnx of {run_dir} ({e}): "
                              f"re-export with `qdefend export {run_dir}`") from None
        return ServiceTarget(enc, head, output, post=post)
    if spec in ("torch-float", "torch-int8"):
        if run is None:
            paths.require_trained()
        return TorchTarget.from_run(run if run is not None else run_dir, spec.split("-")[1])
    if spec.endswith((".onnx", ".tflite")):
        if not paths.manifest.is_file():
            raise AttackError(f"{run_dir} has no exported artifacts (no manifest.json): run "
                              f"`qdefend export {run_dir}` first, or attack torch-float / torch-int8")
        from qdefend.edge.manifest import load_manifest

        arts = load_manifest(run_dir)["artifacts"]
        if spec not in arts:
            raise AttackError(f"{run_dir} has no artifact '{spec}'. Valid targets: {', '.join(target_specs(run_dir))} "
                              f"(or re-export with `qdefend export {run_dir}`)")
        return RuntimeTarget.open(run_dir, spec, interpreter=interpreter, threads=threads, run=run)
    raise AttackError(f"unknown target '{spec}'. Valid targets: {', '.join(target_specs(run_dir))}")
