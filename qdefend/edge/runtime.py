"""Run an exported artifact exactly as a device does: numpy plus one interpreter, no torch.

``Runtime.open(run_dir)`` checks the artifact's sha256 against the manifest *before* loading it,
picks an interpreter (LiteRT, else tflite-runtime, for .tflite; onnxruntime for .onnx) and
cross-checks the artifact's tensors with the manifest. ``encode(images)`` is what a device
sends: normalise camera pixels with the manifest normalisation, run the encoder (quantising the
input for int8 artifacts, dequantising int8 outputs), apply the release transform (noise,
dropout, pruning) and quantise onto the manifest's wire grid (8 bits or fewer, per tensor or per
channel, in the grid's order). Export verification and every attack go
through this module, so an attack on an artifact sees exactly the bytes a device would send.

The release steps and the wire grid are :mod:`qdefend.edge.release` (one table for every
consumer). This file and its neighbours in :mod:`qdefend.edge` are copied as-is into device
bundles: they import only the standard library and numpy; interpreters are imported lazily inside
functions.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:
    from .cpu import ENV, ort_int8_precision
    from .errors import ArtifactError
    from .manifest import load_manifest, manifest_path, verify_artifact
    from .release import apply_release, dequantize, quantize, to_wire, wire_bits, wire_dequantize
    from .wire import plain_grid
except ImportError:  # copied flat into a device bundle
    from cpu import ENV, ort_int8_precision
    from errors import ArtifactError
    from manifest import load_manifest, manifest_path, verify_artifact
    from release import apply_release, dequantize, quantize, to_wire, wire_bits, wire_dequantize
    from wire import plain_grid

__all__ = ["INTERPRETERS", "Features", "Runtime", "apply_release", "quantize", "dequantize", "ArtifactError"]


class Features:
    """Released features as they travel: int8 codes (``bits`` wide) plus the scale/zero-point to
    read them (numbers, or lists of one per channel for a per-channel wire)."""

    __slots__ = ("q", "scale", "zero_point", "bits")

    def __init__(self, q: np.ndarray, scale, zero_point, bits: int = 8):
        self.q, self.bits = np.asarray(q, np.int8), int(bits)
        self.scale, self.zero_point = plain_grid(scale, zero_point)

    @classmethod
    def on_grid(cls, q: np.ndarray, wire: dict) -> "Features":
        return cls(q, wire["scale"], wire["zero_point"], wire_bits(wire))

    def dequantize(self) -> np.ndarray:
        """The float32 features the cloud side sees."""
        return wire_dequantize(self.q, {"scale": self.scale, "zero_point": self.zero_point})

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    def __len__(self) -> int:
        return len(self.q)

    def __repr__(self) -> str:
        if isinstance(self.scale, list):
            return f"Features(shape={self.q.shape}, bits={self.bits}, per-channel grid of {len(self.scale)})"
        return f"Features(shape={self.q.shape}, bits={self.bits}, scale={self.scale:.6g}, zero_point={self.zero_point})"


# --------------------------------------------------------------------------------------------
# Interpreters

INTERPRETERS = {"tflite": ("litert", "tflite-runtime"), "onnx": ("onnxruntime",)}
_PIP = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime", "onnxruntime": "onnxruntime"}
_DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


def _import_interpreter(name: str) -> tuple[Any, str] | None:
    """(Interpreter class or onnxruntime module, version), or None if it cannot be imported."""
    try:
        if name == "litert":
            import ai_edge_litert as pkg
            from ai_edge_litert.interpreter import Interpreter as impl
        elif name == "tflite-runtime":
            import tflite_runtime as pkg
            from tflite_runtime.interpreter import Interpreter as impl
        else:
            import onnxruntime as pkg
            impl = pkg
    except ImportError:
        return None
    try:
        return impl, getattr(pkg, "__version__", None) or metadata.version(_PIP[name])
    except metadata.PackageNotFoundError:
        return impl, "unknown"


def _chunked(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    """Run a fixed-batch `fn` over any number of rows, padding the last chunk by repeating a row."""
    outs = []
    for i in range(0, len(x), batch):
        c = x[i:i + batch]
        if len(c) < batch:
            c = np.concatenate([c, np.repeat(c[-1:], batch - len(c), axis=0)])
        outs.append(fn(c)[: min(batch, len(x) - i)])
    return np.concatenate(outs)


class _TFLite:
    """A LiteRT/tflite-runtime interpreter that takes any batch size.

    litert-torch bakes the sample batch into the graph unless converted with dynamic_shapes; then
    resize_tensor_input + allocate_tensors fails (constant RESHAPE shapes) or could give a wrong
    output shape, so the batch is run in chunks of the converted size instead."""

    def __init__(self, cls: Any, path: Path, threads: int | None):
        self._make = lambda: cls(model_path=str(path), **({"num_threads": threads} if threads else {}))
        self._load()
        if len(self.it.get_input_details()) != 1 or len(self.it.get_output_details()) != 1:
            raise ArtifactError(f"{path.name} must have one input and one output tensor: re-export it")
        self.fixed, self.out_dims = self.batch, list(self.it.get_output_details()[0]["shape"][1:])
        self.dynamic = int(self.it.get_input_details()[0]["shape_signature"][0]) == -1
        self.resizable: bool | None = True if self.dynamic else None  # None: not tried yet

    def _load(self) -> None:
        self.it = self._make()
        self.it.allocate_tensors()
        self.batch = int(self.it.get_input_details()[0]["shape"][0])

    def spec(self, side: str) -> dict:
        d = (self.it.get_input_details() if side == "input" else self.it.get_output_details())[0]
        scale, zp = d["quantization"]
        return {"name": d["name"], "shape": [None if v < 0 else int(v) for v in d["shape_signature"]],
                "dtype": np.dtype(d["dtype"]).name,
                "quant": {"scale": float(scale), "zero_point": int(zp)} if scale else None}

    def batch_mode(self) -> str:
        how = {True: "resized per call", False: "run in chunks", None: "not resized yet"}[self.resizable]
        return "dynamic" if self.dynamic else f"fixed {self.fixed} ({how})"

    def _resize(self, x: np.ndarray) -> None:
        try:
            self.it.resize_tensor_input(self.it.get_input_details()[0]["index"], list(x.shape))
            self.it.allocate_tensors()
            ok = list(self.it.get_output_details()[0]["shape"]) == [len(x), *self.out_dims]
        except (RuntimeError, ValueError):
            ok = False
        self.resizable = ok
        if ok:
            self.batch = len(x)
        else:
            self._load()  # a failed resize can leave the interpreter unusable: start again

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self.it.set_tensor(self.it.get_input_details()[0]["index"], x)
        self.it.invoke()
        return self.it.get_tensor(self.it.get_output_details()[0]["index"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) != self.batch and self.resizable is not False:
            self._resize(x)
        return self._invoke(x) if len(x) == self.batch else _chunked(self._invoke, x, self.batch)


class _Onnx:
    """An onnxruntime CPU session (graph optimisations on, so QDQ pairs fuse into int8 kernels)."""

    def __init__(self, ort: Any, path: Path, threads: int | None, int8_precision: str = "auto",
                 config: dict[str, str] | None = None):
        so = ort.SessionOptions()
        for key, value in (config or {}).items():  # ORT session config entries, e.g. allow_spinning
            so.add_session_config_entry(key, str(value))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        # x86 without VNNI: the default u8s8 int8 kernels saturate 16-bit pair sums (measured on
        # AVX2: up to 160 LSB off), and "1" picks the exact u8u8 path; with VNNI/AMX/ARM it only
        # halves the int8 GEMM rate (edge/cpu.py), so the mode follows the CPU.
        try:
            self.precision = ort_int8_precision(int8_precision)
        except ValueError as e:
            raise ArtifactError(f"{e}: pass int8_precision='auto' or unset ${ENV}") from None
        if self.precision["x64quantprecision"]:
            so.add_session_config_entry("session.x64quantprecision", self.precision["x64quantprecision"])
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        if len(self.sess.get_inputs()) != 1 or len(self.sess.get_outputs()) != 1:
            raise ArtifactError(f"{path.name} must have one input and one output tensor: re-export it")
        b = self.sess.get_inputs()[0].shape[0]
        self.batch = b if isinstance(b, int) else None

    def spec(self, side: str) -> dict:
        t = (self.sess.get_inputs() if side == "input" else self.sess.get_outputs())[0]
        if t.type not in _DTYPES:
            raise ArtifactError(f"unsupported {side} type {t.type}: artifacts take float32/int8/uint8")
        return {"name": t.name, "shape": [v if isinstance(v, int) else None for v in t.shape],
                "dtype": _DTYPES[t.type], "quant": None}  # ONNX graph inputs carry no quant params

    def batch_mode(self) -> str:
        return "dynamic" if self.batch is None else f"fixed {self.batch} (run in chunks)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.batch not in (None, len(x)):
            return _chunked(self, x, self.batch)
        return self.sess.run(None, {self.sess.get_inputs()[0].name: x})[0]


def _open_backend(fmt: str, path: Path, interpreter: str, threads: int | None, int8_precision: str = "auto",
                  ort_config: dict[str, str] | None = None):
    known = [n for names in INTERPRETERS.values() for n in names]
    if interpreter != "auto" and interpreter not in known:
        raise ArtifactError(f"unknown interpreter {interpreter!r}; choose auto, {', '.join(known)}")
    if interpreter != "auto" and interpreter not in INTERPRETERS[fmt]:
        raise ArtifactError(f"{interpreter} cannot run a .{fmt} artifact; use interpreter='auto' or "
                            f"{' / '.join(INTERPRETERS[fmt])}")
    names = INTERPRETERS[fmt] if interpreter == "auto" else (interpreter,)
    for name in names:
        if (found := _import_interpreter(name)) is not None:
            if fmt == "tflite":
                return _TFLite(found[0], path, threads), name, found[1]
            return _Onnx(found[0], path, threads, int8_precision, ort_config), name, found[1]
    pip = " (or ".join(_PIP[n] for n in names) + ")" * (len(names) - 1)
    raise ArtifactError(f"no interpreter for {path.name} can be imported: pip install {pip}")


# --------------------------------------------------------------------------------------------
# The runtime


def _fmt(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


class Runtime:
    """One verified artifact of a run, loaded in an interpreter. Build it with :meth:`open`."""

    def __init__(self, manifest: dict, run_dir: Path, name: str, backend: Any, interpreter: str,
                 version: str, threads: int | None):
        self.manifest, self.run_dir, self.name = manifest, run_dir, name
        self.entry = manifest["artifacts"][name]
        self.backend, self.interpreter_name, self.interpreter_version = backend, interpreter, version
        self.threads = threads  # as asked; None = the interpreter's default
        self.int8_precision = getattr(backend, "precision", None)  # ONNX Runtime's int8 mode, and why
        self.input_spec, self.output_spec = backend.spec("input"), backend.spec("output")
        self._in_q = self._check("input", self.input_spec)
        self._out_q = self._check("output", self.output_spec)

    @classmethod
    def open(cls, run_dir_or_manifest_path: str | os.PathLike, artifact: str = "encoder.int8.tflite", *,
             interpreter: str = "auto", threads: int | None = None, int8_precision: str = "auto",
             ort_config: dict[str, str] | None = None) -> "Runtime":
        """Load `artifact` of a run after checking its size and sha256 against the manifest.

        interpreter: "auto" (LiteRT, else tflite-runtime, for .tflite; onnxruntime for .onnx),
        "litert", "tflite-runtime" or "onnxruntime". threads: interpreter CPU threads (None =
        its default). int8_precision: ONNX Runtime's int8 mode, "auto" (from the CPU, see
        edge/cpu.py), "fast" or "precise". ort_config: extra ONNX Runtime session config entries
        (e.g. {"session.intra_op.allow_spinning": "0"})."""
        manifest = load_manifest(run_dir_or_manifest_path)
        run_dir = manifest_path(run_dir_or_manifest_path).parent
        path = verify_artifact(run_dir, manifest, artifact)
        fmt = manifest["artifacts"][artifact]["format"]
        backend, name, version = _open_backend(fmt, path, interpreter, threads, int8_precision, ort_config)
        return cls(manifest, run_dir, artifact, backend, name, version, threads)

    def _check(self, side: str, got: dict) -> tuple[float, int, Any] | None:
        """Cross-check the interpreter's tensor with the manifest; the quant params to use, if int."""
        want = self.entry[side]
        hint = f"re-export with `qdefend export {self.run_dir}`"
        dims_ok = len(got["shape"]) == len(want["shape"]) and all(
            g is None or g == w for g, w in zip(got["shape"][1:], want["shape"][1:]))
        if got["dtype"] != want["dtype"] or not dims_ok:
            raise ArtifactError(f"{self.name} {side} is {_fmt([None, *got['shape'][1:]])} {got['dtype']} "
                                f"but the manifest says {_fmt(want['shape'])} {want['dtype']}: {hint}")
        if got["dtype"] == "float32":
            return None
        q, mq = got["quant"], want["quant"]
        if q is not None and not (np.isclose(q["scale"], mq["scale"], rtol=1e-5, atol=0)
                                  and q["zero_point"] == mq["zero_point"]):
            raise ArtifactError(f"{self.name} {side} quantisation (scale {q['scale']:.6g}, zero point "
                                f"{q['zero_point']}) differs from the manifest ({mq['scale']:.6g}, "
                                f"{mq['zero_point']}): {hint}")
        q = q or mq
        return q["scale"], q["zero_point"], np.dtype(got["dtype"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw artifact call: float32 (N, *input shape) -> float32 outputs.

        Encoders take already-normalised inputs, heads take float features. int8 inputs are
        quantised with the artifact's input grid and int8 outputs dequantised."""
        x = np.asarray(x)
        want = self.entry["input"]["shape"]
        if x.ndim != len(want) or list(x.shape[1:]) != want[1:] or not np.issubdtype(x.dtype, np.floating):
            raise ArtifactError(f"{self.name} input must be {_fmt([None, *want[1:]])} float32, "
                                f"got {x.shape} {x.dtype}")
        x = np.ascontiguousarray(x, np.float32)
        if len(x) == 0:
            return np.zeros((0, *self.entry["output"]["shape"][1:]), np.float32)
        if self._in_q:
            x = quantize(x, *self._in_q)
        y = self.backend(x)
        return dequantize(y, *self._out_q[:2]) if self._out_q else np.asarray(y, np.float32)

    def _pixels(self, images: Any) -> np.ndarray:
        """Camera pixels (N, C, H, W) uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
        a = np.asarray(images)
        shape = self.manifest["input"]["shape"]
        if a.ndim != 4 or list(a.shape[1:]) != shape or a.dtype not in (np.uint8, np.float32, np.float64):
            raise ArtifactError(f"input must be {_fmt([None, *shape])} uint8 or float32 in [0,1], "
                                f"got {a.shape} {a.dtype}")
        if a.dtype == np.uint8:
            return np.divide(a, 255, dtype=np.float32)
        a = a.astype(np.float32, copy=False)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1):
            got = f"[{a.min():.3g}, {a.max():.3g}]" if np.isfinite(a).all() else "NaN or Inf"
            raise ArtifactError(f"float input must be pixels in [0,1], got {got}: pass uint8 images or "
                                f"divide by 255 (do not normalise: the runtime applies the manifest normalisation)")
        return a

    def encode(self, images: Any, *, release: bool = True, seed: int | None = None,
               rng: np.random.Generator | None = None, batch_size: int = 256) -> Features:
        """What a device sends for `images`: normalise, encode, release, quantise to the wire.

        images: (N, C, H, W) uint8 [0, 255] or float32 [0, 1] pixels. release=False skips the
        release steps (the bare encoder output on the wire grid). Randomness comes from `rng`, or
        a fresh generator seeded with `seed`; the result does not depend on batch_size."""
        if self.entry["role"] != "encoder":
            raise ArtifactError(f"{self.name} is a {self.entry['role']}, not an encoder: use .run(features)")
        if rng is not None and seed is not None:
            raise ArtifactError("pass either seed or rng to encode(), not both")
        if batch_size < 1:
            raise ArtifactError(f"batch_size must be >= 1, got {batch_size}")
        z = self.encoder_output(images, batch_size=batch_size)
        wire = self.manifest["features"]["wire"]
        q = to_wire(z, self.manifest["release"]["steps"], wire, rng or np.random.default_rng(seed), release=release)
        return Features.on_grid(q, wire)

    def encoder_output(self, images: Any, *, batch_size: int = 256) -> np.ndarray:
        """The encoder's own float output for `images` (normalised, run, dequantised): what
        `encode` releases and puts on the wire. Noise-aware attackers simulate the release on it."""
        if self.entry["role"] != "encoder":
            raise ArtifactError(f"{self.name} is a {self.entry['role']}, not an encoder: use .run(features)")
        if batch_size < 1:
            raise ArtifactError(f"batch_size must be >= 1, got {batch_size}")
        x = self._pixels(images)
        norm = self.manifest["input"]["normalization"]
        mean, std = (np.asarray(norm[k], np.float32).reshape(-1, 1, 1) for k in ("mean", "std"))
        x = (x - mean) / std
        return np.concatenate([self.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
                              or [self.run(x)])

    def info(self) -> dict:
        """What `qdefend inspect` shows: the artifact, its interpreter and its tensors."""
        keys = ("path", "format", "role", "precision", "sha256", "size_bytes")
        return {"artifact": self.name, **{k: self.entry[k] for k in keys},
                "interpreter": self.interpreter_name, "interpreter_version": self.interpreter_version,
                "threads": self.threads, "batch": self.backend.batch_mode(), "int8_precision": self.int8_precision,
                "input": self.input_spec, "output": self.output_spec,
                "release": self.manifest["release"]["steps"], "wire": self.manifest["features"]["wire"]}
