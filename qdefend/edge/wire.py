"""The features message a device sends to the cloud head: one compact binary layout, one JSON twin.

A device encodes images, applies the release transform and quantises onto the wire grid
(:meth:`runtime.Runtime.encode`); this module puts those int8 codes, their scale/zero-point and
the sha256 of the encoder that made them into one HTTP body (``POST /v1/infer`` of ``qdefend
serve``). The server checks every field against the run's manifest before it runs the head.

Binary body, ``Content-Type: application/x-qdefend-features`` (all integers little-endian)::

    offset  size     field
    0       4        magic b"QDF1"
    4       1        version (1)
    5       1        dtype code (1 = int8; the only one)
    6       1        ndim, 2..8 (batch first: N, C, H, W for conv features)
    7       1        reserved (0)
    8       8        scale, float64
    16      4        zero_point, int32
    20      32       sha256 of the encoder artifact, raw bytes
    52      4*ndim   dims, uint32
    52+4n   prod     the int8 codes, C order

That is 68 bytes of header for 4-D features (e.g. 68 + 392 bytes for one 8x7x7 feature map).

JSON body, ``Content-Type: application/json`` (for debugging, curl and the tests)::

    {"shape": [1, 8, 7, 7], "dtype": "int8", "scale": 0.0039, "zero_point": -128,
     "encoder_sha256": "ab12...", "features": [-128, -97, ...]}      (flat, C order)

The answer is JSON either way: ``{"labels": [...], "classes": [...], "probabilities": [[...]]}``.

This file is copied as-is into device bundles (stdlib + numpy only) and mirrored by the
browser page's ``qdefend.js``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

try:
    from .errors import ArtifactError
except ImportError:  # copied flat into a device bundle
    from errors import ArtifactError

__all__ = ["BINARY_TYPE", "JSON_TYPE", "MAGIC", "WireError", "Message", "pack", "unpack", "to_json", "from_json",
           "header_size", "max_body_bytes"]

MAGIC = b"QDF1"
VERSION = 1
DTYPES = {1: "int8"}
BINARY_TYPE = "application/x-qdefend-features"
JSON_TYPE = "application/json"
MAX_NDIM = 8
_HEAD = struct.Struct("<4sBBBBdi32s")  # magic, version, dtype, ndim, reserved, scale, zero_point, sha256
_SHA = re.compile(r"[0-9a-f]{64}")


class WireError(ArtifactError):
    """A features message that cannot be read: the message says which field and what is wrong."""


class Message:
    """One decoded features message: int8 codes (numpy), their grid and the encoder's sha256."""

    __slots__ = ("q", "scale", "zero_point", "encoder_sha256")

    def __init__(self, q, scale: float, zero_point: int, encoder_sha256: str):
        self.q, self.scale, self.zero_point, self.encoder_sha256 = q, float(scale), int(zero_point), encoder_sha256

    @property
    def shape(self) -> list[int]:
        return list(self.q.shape)


def header_size(ndim: int) -> int:
    return _HEAD.size + 4 * ndim


def max_body_bytes(feature_shape: list[int], max_batch: int) -> int:
    """The largest valid body for `max_batch` samples: the binary size, or the JSON size (5 chars a code)."""
    per = math.prod(feature_shape)
    return max(header_size(1 + len(feature_shape)) + max_batch * per, 4096 + max_batch * per * 5)


def _check_grid(scale: Any, zero_point: Any) -> None:
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise WireError(f"scale must be a finite number > 0, got {scale!r}")
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not -128 <= zero_point <= 127:
        raise WireError(f"zero_point must be an integer in [-128, 127], got {zero_point!r}")


def _check_sha(sha: Any) -> str:
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise WireError("encoder_sha256 must be 64 lowercase hex digits: the sha256 of the encoder artifact "
                        "(see GET /v1/manifest)")
    return sha


def pack(q, scale: float, zero_point: int, encoder_sha256: str) -> bytes:
    """The binary body for int8 codes `q` (N, ...) on the grid (scale, zero_point)."""
    import numpy as np

    q = np.asarray(q)
    if q.dtype != np.int8:
        raise WireError(f"features must be int8 codes, got {q.dtype}: quantise them with the manifest's wire grid")
    if not 2 <= q.ndim <= MAX_NDIM:
        raise WireError(f"features must have 2..{MAX_NDIM} dimensions (batch first), got shape {list(q.shape)}")
    _check_grid(float(scale), int(zero_point))
    sha = bytes.fromhex(_check_sha(encoder_sha256))
    head = _HEAD.pack(MAGIC, VERSION, 1, q.ndim, 0, float(scale), int(zero_point), sha)
    return head + struct.pack(f"<{q.ndim}I", *q.shape) + np.ascontiguousarray(q).tobytes()


def unpack(body: bytes) -> Message:
    """Decode a binary body; every malformed field is a WireError naming it."""
    import numpy as np

    if len(body) < _HEAD.size:
        raise WireError(f"body is {len(body)} bytes, shorter than the {_HEAD.size}-byte header")
    magic, version, dtype, ndim, _, scale, zp, sha = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise WireError(f"body does not start with {MAGIC!r}: send a qdefend features message "
                        f"(Content-Type {BINARY_TYPE}) or JSON (Content-Type {JSON_TYPE})")
    if version != VERSION:
        raise WireError(f"message version {version} is not supported (this server reads {VERSION}): update the client")
    if dtype not in DTYPES:
        raise WireError(f"dtype code {dtype} is not supported: features travel as int8 (code 1)")
    if not 2 <= ndim <= MAX_NDIM:
        raise WireError(f"ndim {ndim} is out of range 2..{MAX_NDIM}")
    if len(body) < header_size(ndim):
        raise WireError(f"body is {len(body)} bytes, shorter than its {header_size(ndim)}-byte header")
    dims = struct.unpack_from(f"<{ndim}I", body, _HEAD.size)
    n = math.prod(dims)
    payload = memoryview(body)[header_size(ndim):]
    if len(payload) != n:
        raise WireError(f"shape {list(dims)} needs {n} bytes of int8 codes, the body carries {len(payload)}")
    _check_grid(scale, zp)
    q = np.frombuffer(payload, dtype=np.int8).reshape(dims)
    return Message(q, scale, zp, sha.hex())


def to_json(q, scale: float, zero_point: int, encoder_sha256: str) -> dict:
    """The JSON twin of :func:`pack`."""
    import numpy as np

    q = np.asarray(q)
    if q.dtype != np.int8:
        raise WireError(f"features must be int8 codes, got {q.dtype}")
    return {"shape": list(q.shape), "dtype": "int8", "scale": float(scale), "zero_point": int(zero_point),
            "encoder_sha256": _check_sha(encoder_sha256), "features": q.reshape(-1).tolist()}


def from_json(doc: Any) -> Message:
    """Decode a JSON body (already parsed); every malformed field is a WireError naming it."""
    import numpy as np

    if not isinstance(doc, dict):
        raise WireError("JSON body must be an object with shape, dtype, scale, zero_point, encoder_sha256, features")
    missing = [k for k in ("shape", "scale", "zero_point", "encoder_sha256", "features") if k not in doc]
    if missing:
        raise WireError(f"JSON body lacks {', '.join(missing)}")
    if doc.get("dtype", "int8") != "int8":
        raise WireError(f"dtype {doc['dtype']!r} is not supported: features travel as int8")
    shape = doc["shape"]
    if (not isinstance(shape, list) or not 2 <= len(shape) <= MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError(f"shape must be a list of 2..{MAX_NDIM} integers >= 0 (batch first), got {shape!r}")
    _check_grid(doc["scale"], doc["zero_point"])
    feats = doc["features"]
    if not isinstance(feats, list) or len(feats) != math.prod(shape):
        got = len(feats) if isinstance(feats, list) else type(feats).__name__
        raise WireError(f"features must be a flat list of {math.prod(shape)} int8 codes for shape {shape}, got {got}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and -128 <= v <= 127 for v in feats):
        raise WireError("features must be integers in [-128, 127] (int8 codes)")
    q = np.asarray(feats, dtype=np.int8).reshape(shape)
    return Message(q, doc["scale"], doc["zero_point"], _check_sha(doc["encoder_sha256"]))


def loads_json(body: bytes) -> Message:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"body is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    return from_json(doc)
