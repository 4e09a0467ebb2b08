"""The run manifest: what an exported artifact is, how to feed it and what it releases.

``runs/NAME/manifest.json`` is the contract between export, devices and attacks. It records, for
each artifact file, its sha256 and size (so a tampered or truncated file is refused before it is
loaded), its input/output tensors with their int8 scale/zero-point, the input normalisation, the
release transform applied to the features (noise, dropout, pruning) and the int8 grid the features
travel on ("wire"). A device needs nothing else to produce exactly what the cloud expects.

This module is copied as-is into device bundles next to ``runtime.py``, so it imports only the
standard library and its neighbours in :mod:`qdefend.edge`: ``errors`` (:class:`ArtifactError`,
whose message is one line saying what is wrong and what to do) and ``release`` (what each release
step may hold, and the wire grid).

Layout (top level)::

    run            run name
    created        ISO-8601 time
    model          free-form description of the model (name, cut, ...)
    dataset        {"name", "num_classes", "class_names"}
    input          {"shape": [C,H,W], "dtype": "float32", "range": [0,1], "layout": "NCHW",
                    "normalization": {"mean": [...], "std": [...]}}
    features       {"shape": [C,H,W], "wire": {"dtype": "int8", "bits": 2..8, "granularity": "tensor" |
                    "channel", "order": "release_then_wire" | "wire_then_release", "scale", "zero_point"}}
                   (one scale and zero point per channel when per channel; codes in
                    [-2^(bits-1), 2^(bits-1) - 1]; bits, granularity and order default to 8, tensor,
                    release_then_wire for manifests written before they existed)
    release        {"steps": [{"type": "gaussian_noise", "sigma": 0.1}, ...]}
    artifacts      {name: artifact_entry(...)}
    tools          {package: version}
    warnings       [str]
    verification   free-form (parity, accuracy)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

try:
    from .errors import ArtifactError
    from .release import STEP_TYPES, _fail, _is_num, check_grid, check_steps, check_wire
except ImportError:  # copied flat into a device bundle
    from errors import ArtifactError
    from release import STEP_TYPES, _fail, _is_num, check_grid, check_steps, check_wire

__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "MANIFEST_NAME", "FORMATS", "ROLES", "PRECISIONS", "DTYPES",
    "ArtifactError", "sha256_file", "artifact_entry", "validate_manifest",
    "write_manifest", "manifest_path", "load_manifest", "verify_artifact", "artifact_path", "device_accuracy",
]

SCHEMA = "qdefend.manifest"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "tflite")
ROLES = ("encoder", "head")
PRECISIONS = ("int8", "float")
DTYPES = ("float32", "int8", "uint8")
_REQUIRED = ("run", "created", "model", "dataset", "input", "features", "release", "artifacts",
             "tools", "warnings", "verification")


# --------------------------------------------------------------------------------------------
# Files


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    """`obj` as plain JSON types (numpy scalars/arrays become floats/ints/lists); NaN/Inf refused."""
    def default(o):
        if hasattr(o, "tolist"):  # numpy arrays and scalars, without importing numpy
            return o.tolist()
        if isinstance(o, (Path, os.PathLike)):
            return os.fspath(o)
        raise TypeError(f"{type(o).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(obj, default=default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"manifest value cannot be written as JSON ({e}): pass plain numbers, "
                            f"strings, lists and dicts") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# Validation (every message names the bad key)


def _need(d: Any, key: str, prefix: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        _fail(f"{prefix}{key}", "is missing")
    return d[key]


def _check_tensor(spec: Any, key: str) -> None:
    if not isinstance(spec, dict):
        _fail(key, "must be a tensor spec {name, shape, dtype, quant}")
    if not isinstance(_need(spec, "name", key + "."), str):
        _fail(f"{key}.name", "must be a string")
    shape = _need(spec, "shape", key + ".")
    if not isinstance(shape, list) or not shape or not all(d is None or (_is_int(d) and d > 0) for d in shape):
        _fail(f"{key}.shape", f"must be a list of positive ints or null (dynamic batch), got {shape!r}")
    dtype = _need(spec, "dtype", key + ".")
    if dtype not in DTYPES:
        _fail(f"{key}.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    quant = spec.get("quant")
    if quant is None and dtype != "float32":
        _fail(f"{key}.quant", f"is required for a {dtype} tensor")
    if quant is not None:
        check_grid(quant, f"{key}.quant")


def _check_shape(shape: Any, key: str) -> None:
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and d > 0 for d in shape):
        _fail(key, f"must be a list of positive ints, got {shape!r}")


def _check_entry(entry: Any, key: str) -> None:
    if not isinstance(entry, dict):
        _fail(key, "must be an artifact entry (see artifact_entry)")
    for field, allowed in (("format", FORMATS), ("role", ROLES), ("precision", PRECISIONS)):
        if _need(entry, field, key + ".") not in allowed:
            _fail(f"{key}.{field}", f"must be one of {', '.join(allowed)}, got {entry[field]!r}")
    path = _need(entry, "path", key + ".")
    if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
        _fail(f"{key}.path", f"must be a path inside the run directory, got {path!r}")
    sha = _need(entry, "sha256", key + ".")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        _fail(f"{key}.sha256", "must be a 64-character lowercase hex digest")
    if not (_is_int(_need(entry, "size_bytes", key + ".")) and entry["size_bytes"] >= 0):
        _fail(f"{key}.size_bytes", "must be a non-negative integer")
    _check_tensor(_need(entry, "input", key + "."), f"{key}.input")
    _check_tensor(_need(entry, "output", key + "."), f"{key}.output")


def validate_manifest(m: Any) -> dict:
    """Check a manifest dict's layout; raise ArtifactError naming the first bad key. Returns `m`."""
    if not isinstance(m, dict):
        raise ArtifactError("manifest must be a JSON object: re-export with `qdefend export RUN`")
    for key in _REQUIRED:
        _need(m, key, "")
    ds = m["dataset"]
    if not isinstance(_need(ds, "name", "dataset."), str):
        _fail("dataset.name", "must be a string")
    n = _need(ds, "num_classes", "dataset.")
    if not (_is_int(n) and n > 0):
        _fail("dataset.num_classes", f"must be a positive integer, got {n!r}")
    names = ds.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == n
                                  and all(isinstance(c, str) for c in names)):
        _fail("dataset.class_names", f"must be a list of {n} strings")
    inp = m["input"]
    _check_shape(_need(inp, "shape", "input."), "input.shape")
    if _need(inp, "dtype", "input.") != "float32":
        _fail("input.dtype", f"must be 'float32', got {inp['dtype']!r}")
    if _need(inp, "layout", "input.") != "NCHW":
        _fail("input.layout", f"must be 'NCHW', got {inp['layout']!r}")
    rng = _need(inp, "range", "input.")
    if not (isinstance(rng, list) and len(rng) == 2 and all(map(_is_num, rng)) and rng[0] < rng[1]):
        _fail("input.range", f"must be [low, high], got {rng!r}")
    norm = _need(inp, "normalization", "input.")
    channels = inp["shape"][0]
    for k in ("mean", "std"):
        v = _need(norm, k, "input.normalization.")
        if not (isinstance(v, list) and len(v) in (1, channels) and all(map(_is_num, v))):
            _fail(f"input.normalization.{k}", f"must be a list of 1 or {channels} numbers, got {v!r}")
    if not all(s > 0 for s in norm["std"]):
        _fail("input.normalization.std", "must be positive")
    feats = m["features"]
    _check_shape(_need(feats, "shape", "features."), "features.shape")
    check_wire(_need(feats, "wire", "features."), "features.wire", feats["shape"][0] if feats["shape"] else None)
    check_steps(_need(m["release"], "steps", "release."), "release.steps")
    for i, step in enumerate(m["release"]["steps"]):
        STEP_TYPES[step["type"]].fits(step, feats["shape"], f"release.steps[{i}]")
    arts = m["artifacts"]
    if not isinstance(arts, dict):
        _fail("artifacts", "must map artifact names to entries")
    for name, entry in arts.items():
        key = f"artifacts.{name}"
        _check_entry(entry, key)
        if entry["role"] == "encoder":
            want = [inp["shape"], feats["shape"]]
            for side, shape in zip(("input", "output"), want):
                if entry[side]["shape"][1:] != shape:
                    _fail(f"{key}.{side}.shape", f"is {entry[side]['shape']}, expected [null, "
                          f"{', '.join(map(str, shape))}] (from {'input' if side == 'input' else 'features'}.shape)")
    for key, typ in (("model", dict), ("tools", dict), ("warnings", list), ("verification", dict),
                     ("run", str), ("created", str)):
        if not isinstance(m[key], typ):
            _fail(key, f"must be a {typ.__name__}")
    return m


# --------------------------------------------------------------------------------------------
# Writing and reading


def artifact_entry(root: str | os.PathLike, relpath: str, *, format: str, role: str, precision: str,
                   input: dict, output: dict, **extra: Any) -> dict:
    """The manifest entry of the artifact file root/relpath: sha256, size, tensors, extra keys.

    format "onnx"|"tflite"; role "encoder"|"head"; precision "int8"|"float"; input/output are
    tensor specs {"name", "shape" (null = dynamic batch), "dtype", "quant": {"scale",
    "zero_point"} or null}. Extra keys (opset, op_counts, verification, ...) are kept as given.
    """
    path = Path(root) / relpath
    if not path.is_file():
        raise ArtifactError(f"artifact file {path} does not exist: write it before its manifest entry")
    entry = _plain(dict(extra, path=Path(relpath).as_posix(), format=format, role=role,
                        precision=precision, input=input, output=output,
                        sha256=sha256_file(path), size_bytes=path.stat().st_size))
    _check_entry(entry, f"artifacts.{Path(relpath).name}")
    return entry


def write_manifest(run_dir: str | os.PathLike, manifest: dict) -> Path:
    """Validate `manifest` and write run_dir/manifest.json atomically (tmp file + os.replace).

    Missing "created", "model", "tools", "warnings", "verification" get defaults ("run" defaults to
    the directory name); "schema" and "schema_version" are added. Keys are sorted, indent 2.
    """
    run_dir = Path(run_dir)
    m = _plain(manifest)
    m.setdefault("run", run_dir.resolve().name)
    m.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    for key, empty in (("model", {}), ("tools", {}), ("warnings", []), ("verification", {})):
        m.setdefault(key, empty)
    m["schema"], m["schema_version"] = SCHEMA, SCHEMA_VERSION
    validate_manifest(m)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / MANIFEST_NAME
    tmp = run_dir / f".{MANIFEST_NAME}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(m, f, sort_keys=True, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def manifest_path(path_or_run_dir: str | os.PathLike) -> Path:
    """The manifest file meant by a run directory or a path to a .json file."""
    p = Path(path_or_run_dir)
    return p if p.suffix == ".json" and not p.is_dir() else p / MANIFEST_NAME


def load_manifest(path_or_run_dir: str | os.PathLike) -> dict:
    """Read and validate a manifest, given its path or its run directory."""
    path = manifest_path(path_or_run_dir)
    run = path.parent
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_NAME} in {run}: run `qdefend export {run}` first")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}): re-export with `qdefend export {run}`") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA:
        got = m.get("schema") if isinstance(m, dict) else type(m).__name__
        raise ArtifactError(f"{path} is not a qdefend manifest (schema {got!r}, expected {SCHEMA!r}): "
                            f"re-export with `qdefend export {run}`")
    version = m.get("schema_version")
    if not _is_int(version) or version < 1:
        raise ArtifactError(f"{path} has an invalid schema_version {version!r}: re-export with "
                            f"`qdefend export {run}`")
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{path} was written by a newer qdefend (schema_version {version}, this one "
                            f"reads {SCHEMA_VERSION}): upgrade with `pip install -U qdefend`")
    try:
        return validate_manifest(m)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}".replace("RUN`", f"{run}`")) from None


def artifact_path(run_dir: str | os.PathLike, manifest: dict, name: str) -> Path:
    """run_dir/<path of artifact `name`>; ArtifactError listing the artifacts if `name` is unknown."""
    arts = manifest.get("artifacts", {})
    if name not in arts:
        raise ArtifactError(f"no artifact '{name}' in the manifest of {run_dir}; available: "
                            f"{', '.join(sorted(arts)) or 'none'}")
    return Path(run_dir) / arts[name]["path"]


def verify_artifact(run_dir: str | os.PathLike, manifest: dict, name: str) -> Path:
    """The path of artifact `name` after checking it exists and its size and sha256 match."""
    path = artifact_path(run_dir, manifest, name)
    entry = manifest["artifacts"][name]
    hint = f"re-export with `qdefend export {run_dir}`"
    if not path.is_file():
        raise ArtifactError(f"{name} is missing ({path} not found): {hint}")
    size = path.stat().st_size
    if size != entry["size_bytes"]:
        raise ArtifactError(f"{name} is truncated or was modified (size mismatch: {size} bytes, manifest "
                            f"says {entry['size_bytes']}): {hint}")
    if sha256_file(path) != entry["sha256"]:
        raise ArtifactError(f"{name} is corrupted or was modified (sha256 mismatch): {hint}")
    return path


def device_accuracy(manifest: dict, name: str) -> float | None:
    """Artifact `name`'s test accuracy as a device delivers it, from the export's verification: with
    the release transform (noise, dropout) when verification measured that, else the artifact's
    plain accuracy; None when neither was measured."""
    ver = manifest.get("verification", {}).get("artifacts", {}).get(name, {})
    return next((v for v in (ver.get("test_acc_release"), ver.get("test_acc")) if v is not None), None)
