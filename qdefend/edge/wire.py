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

Version 2 carries a wire narrower than 8 bits or a per-channel grid (``features.wire`` of the
manifest: bits, granularity). The codes are bit-packed, so a 4-bit wire sends half the bytes::

    offset  size     field
    0       4        magic b"QDF1"
    4       1        version (2)
    5       1        bits per code, 2..8
    6       1        ndim, 2..8
    7       1        axis of the grid: 0 = one scale (per tensor), 1 = one per channel (dim 1)
    8       32       sha256 of the encoder artifact, raw bytes
    40      4*ndim   dims, uint32
    ...     12 or    the grid: scale float64 + zero_point int32 (per tensor), or C float64
            12*C     scales then C int32 zero points (per channel, C = dims[1])
    ...     ceil(n*bits/8)  the n codes, each stored as code + 2^(bits-1) in `bits` bits,
                     least significant bit first, packed into bytes from bit 0 (numpy's
                     packbits(bitorder="little")); the last byte's unused bits are zero

68 + 196 bytes for one 8x7x7 feature map at 4 bits per tensor. A per-tensor int8 wire always
travels as version 1, so older clients and servers keep working.

JSON body, ``Content-Type: application/json`` (for debugging, curl and the tests)::

    {"shape": [1, 8, 7, 7], "dtype": "int8", "scale": 0.0039, "zero_point": -128,
     "encoder_sha256": "ab12...", "features": [-128, -97, ...]}      (flat, C order)

plus ``"bits": B`` below 8 bits (codes then lie in [-2^(B-1), 2^(B-1) - 1]) and lists of one
scale and zero point per channel for a per-channel grid.

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
    from .release import code_range
except ImportError:  # copied flat into a device bundle
    from errors import ArtifactError
    from release import code_range

__all__ = ["BINARY_TYPE", "JSON_TYPE", "MAGIC", "WireError", "Message", "pack", "unpack", "to_json", "from_json",
           "header_size", "max_body_bytes", "pack_bits", "unpack_bits", "payload_size", "same_grid", "describe_grid",
           "plain_grid"]

MAGIC = b"QDF1"
VERSION = 1  # per-tensor int8
VERSION_PACKED = 2  # bit-packed codes (2..8 bits) and/or a per-channel grid
DTYPES = {1: "int8"}
BINARY_TYPE = "application/x-qdefend-features"
JSON_TYPE = "application/json"
MAX_NDIM = 8
_HEAD = struct.Struct("<4sBBBBdi32s")  # magic, version, dtype, ndim, reserved, scale, zero_point, sha256
_HEAD2 = struct.Struct("<4sBBBB32s")  # magic, version, bits, ndim, axis, sha256
_SHA = re.compile(r"[0-9a-f]{64}")


class WireError(ArtifactError):
    """A features message that cannot be read: the message says which field and what is wrong."""


class Message:
    """One decoded features message: int8 codes (numpy), their grid (a scale and zero point, or
    lists of one per channel), the bits per code and the encoder's sha256."""

    __slots__ = ("q", "scale", "zero_point", "encoder_sha256", "bits")

    def __init__(self, q, scale, zero_point, encoder_sha256: str, bits: int = 8):
        self.q, self.encoder_sha256, self.bits = q, encoder_sha256, int(bits)
        self.scale, self.zero_point = plain_grid(scale, zero_point)

    @property
    def per_channel(self) -> bool:
        return isinstance(self.scale, list)

    @property
    def shape(self) -> list[int]:
        return list(self.q.shape)


def same_grid(msg: "Message", grid: dict) -> bool:
    """Whether a message's bits and grid are the manifest's ``features.wire`` (scales to 1e-6 relative)."""
    want_s, want_z = grid["scale"], grid["zero_point"]
    if msg.bits != int(grid.get("bits", 8)) or isinstance(msg.scale, list) != isinstance(want_s, list):
        return False
    got_s, got_z = (msg.scale, msg.zero_point) if msg.per_channel else ([msg.scale], [msg.zero_point])
    want_s, want_z = (want_s, want_z) if isinstance(want_s, list) else ([want_s], [want_z])
    return (len(got_s) == len(want_s) and list(got_z) == list(want_z)
            and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got_s, want_s)))


def describe_grid(bits: int, scale, zero_point) -> str:
    if isinstance(scale, list):
        return f"{bits} bits, per channel: scales {', '.join(f'{v:.6g}' for v in scale[:4])}{', ...' if len(scale) > 4 else ''}"
    return f"{bits} bits, scale {scale:.9g}, zero point {zero_point}"


def header_size(ndim: int, *, version: int = VERSION, channels: int | None = None) -> int:
    """Bytes before the codes: version 1, or version 2 with one grid (channels None) or C."""
    if version == VERSION:
        return _HEAD.size + 4 * ndim
    return _HEAD2.size + 4 * ndim + 12 * (channels or 1)


def payload_size(n: int, bits: int = 8) -> int:
    """Bytes that n codes of `bits` bits take on the wire: ceil(n * bits / 8)."""
    return -(-n * bits // 8)


def max_body_bytes(feature_shape: list[int], max_batch: int) -> int:
    """The largest valid body for `max_batch` samples: the binary size (int8 codes, a per-channel
    grid), or the JSON size (5 chars a code and 40 a channel's grid)."""
    per, channels = math.prod(feature_shape), (feature_shape[0] if feature_shape else 1)
    return max(header_size(1 + len(feature_shape), version=VERSION_PACKED, channels=channels) + max_batch * per,
               4096 + max_batch * per * 5 + 40 * channels)


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise WireError(f"bits must be an integer in 2..8, got {bits!r}")
    return bits


def _check_grid(scale: Any, zero_point: Any, bits: int = 8) -> None:
    lo, hi = code_range(bits)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise WireError(f"scale must be a finite number > 0, got {scale!r}")
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not lo <= zero_point <= hi:
        raise WireError(f"zero_point must be an integer in [{lo}, {hi}] for {bits}-bit codes, got {zero_point!r}")


def _check_grids(scale: Any, zero_point: Any, bits: int, shape: list[int]) -> None:
    """One grid (numbers) or one per channel (lists of dims[1] numbers)."""
    if isinstance(scale, list) or isinstance(zero_point, list):
        c = shape[1] if len(shape) > 1 else None
        if not (isinstance(scale, list) and isinstance(zero_point, list) and len(scale) == len(zero_point) == c):
            raise WireError(f"a per-channel grid needs lists of {c} scales and {c} zero points (one per channel "
                            f"of shape {list(shape)})")
        for s_, z_ in zip(scale, zero_point):
            _check_grid(s_, z_, bits)
    else:
        _check_grid(scale, zero_point, bits)


def pack_bits(q, bits: int) -> bytes:
    """int8 codes in [-2^(bits-1), 2^(bits-1) - 1] -> ceil(n * bits / 8) bytes (layout in the module doc)."""
    import numpy as np

    u = (np.asarray(q, np.int16).reshape(-1) + (1 << (bits - 1))).astype(np.uint8)
    if bits == 8:
        return u.tobytes()
    planes = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf, n: int, bits: int):
    """The inverse of :func:`pack_bits`: n int8 codes (flat) from the packed bytes."""
    import numpy as np

    raw = np.frombuffer(buf, np.uint8)
    if bits == 8:
        u = raw[:n].astype(np.int16)
    else:
        planes = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits).astype(np.int16)
        u = planes @ (np.int16(1) << np.arange(bits, dtype=np.int16))
    return (u - (1 << (bits - 1))).astype(np.int8)


def _check_sha(sha: Any) -> str:
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise WireError("encoder_sha256 must be 64 lowercase hex digits: the sha256 of the encoder artifact "
                        "(see GET /v1/manifest)")
    return sha


def plain_grid(scale: Any, zero_point: Any):
    """A grid as plain Python values: (float, int), or lists of them per channel (from lists,
    tuples or numpy arrays)."""
    if hasattr(scale, "tolist"):
        scale = scale.tolist()
    if hasattr(zero_point, "tolist"):
        zero_point = zero_point.tolist()
    if isinstance(scale, (list, tuple)):
        return [float(v) for v in scale], [int(v) for v in zero_point]
    return float(scale), int(zero_point)


def pack(q, scale, zero_point, encoder_sha256: str, *, bits: int = 8) -> bytes:
    """The binary body for int8 codes `q` (N, ...) on the grid (scale, zero_point): numbers, or
    lists of one per channel (dim 1); `bits` per code (2..8, bit-packed below 8)."""
    import numpy as np

    q = np.asarray(q)
    if q.dtype != np.int8:
        raise WireError(f"features must be int8 codes, got {q.dtype}: quantise them with the manifest's wire grid")
    if not 2 <= q.ndim <= MAX_NDIM:
        raise WireError(f"features must have 2..{MAX_NDIM} dimensions (batch first), got shape {list(q.shape)}")
    bits = _check_bits(bits)
    scale, zero_point = plain_grid(scale, zero_point)
    _check_grids(scale, zero_point, bits, list(q.shape))
    sha = bytes.fromhex(_check_sha(encoder_sha256))
    dims = struct.pack(f"<{q.ndim}I", *q.shape)
    if bits == 8 and not isinstance(scale, list):
        head = _HEAD.pack(MAGIC, VERSION, 1, q.ndim, 0, scale, zero_point, sha)
        return head + dims + np.ascontiguousarray(q).tobytes()
    lo, hi = code_range(bits)
    if q.size and (int(q.min()) < lo or int(q.max()) > hi):
        raise WireError(f"{bits}-bit codes must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]: "
                        "quantise with the manifest's wire grid")
    per_channel = isinstance(scale, list)
    grid = (struct.pack(f"<{len(scale)}d{len(scale)}i", *scale, *zero_point) if per_channel
            else struct.pack("<di", scale, zero_point))
    head = _HEAD2.pack(MAGIC, VERSION_PACKED, bits, q.ndim, 1 if per_channel else 0, sha)
    return head + dims + grid + pack_bits(q, bits)


def unpack(body: bytes) -> Message:
    """Decode a binary body; every malformed field is a WireError naming it."""
    import numpy as np

    if len(body) < _HEAD.size:
        raise WireError(f"body is {len(body)} bytes, shorter than the {_HEAD.size}-byte header")
    magic, version, dtype, ndim, _, scale, zp, sha = _HEAD.unpack_from(body)
    if magic != MAGIC:
        raise WireError(f"body does not start with {MAGIC!r}: send a qdefend features message "
                        f"(Content-Type {BINARY_TYPE}) or JSON (Content-Type {JSON_TYPE})")
    if version == VERSION_PACKED:
        return _unpack_v2(body)
    if version != VERSION:
        raise WireError(f"message version {version} is not supported (this server reads {VERSION} and "
                        f"{VERSION_PACKED}): update the client")
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


def _unpack_v2(body: bytes) -> Message:
    import numpy as np

    if len(body) < _HEAD2.size:
        raise WireError(f"body is {len(body)} bytes, shorter than the {_HEAD2.size}-byte version-2 header")
    _, _, bits, ndim, axis, sha = _HEAD2.unpack_from(body)
    if not 2 <= bits <= 8:
        raise WireError(f"bits {bits} is out of range 2..8")
    if not 2 <= ndim <= MAX_NDIM:
        raise WireError(f"ndim {ndim} is out of range 2..{MAX_NDIM}")
    if axis not in (0, 1):
        raise WireError(f"grid axis {axis} is not supported: 0 (one scale) or 1 (one per channel)")
    if len(body) < _HEAD2.size + 4 * ndim:
        raise WireError(f"body is {len(body)} bytes, shorter than its dims")
    dims = struct.unpack_from(f"<{ndim}I", body, _HEAD2.size)
    c = dims[1] if axis == 1 else None
    start = header_size(ndim, version=VERSION_PACKED, channels=c)
    if len(body) < start:
        raise WireError(f"body is {len(body)} bytes, shorter than its {start}-byte header")
    off = _HEAD2.size + 4 * ndim
    if axis == 1:
        vals = struct.unpack_from(f"<{c}d{c}i", body, off)
        scale, zp = list(vals[:c]), list(vals[c:])
    else:
        scale, zp = struct.unpack_from("<di", body, off)
    n = math.prod(dims)
    payload = memoryview(body)[start:]
    if len(payload) != payload_size(n, bits):
        raise WireError(f"shape {list(dims)} at {bits} bits needs {payload_size(n, bits)} bytes of codes, "
                        f"the body carries {len(payload)}")
    if n * bits % 8 and payload[-1] >> (n * bits % 8):
        raise WireError("the last byte's unused bits must be zero")
    _check_grids(scale, zp, bits, list(dims))
    q = unpack_bits(payload, n, bits).reshape(dims)
    return Message(q, scale, zp, sha.hex(), bits)


def to_json(q, scale, zero_point, encoder_sha256: str, *, bits: int = 8) -> dict:
    """The JSON twin of :func:`pack`."""
    import numpy as np

    q = np.asarray(q)
    if q.dtype != np.int8:
        raise WireError(f"features must be int8 codes, got {q.dtype}")
    bits = _check_bits(bits)
    scale, zero_point = plain_grid(scale, zero_point)
    doc = {"shape": list(q.shape), "dtype": "int8", "scale": scale, "zero_point": zero_point,
           "encoder_sha256": _check_sha(encoder_sha256), "features": q.reshape(-1).tolist()}
    return {**doc, "bits": bits} if bits != 8 else doc


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
    bits = _check_bits(doc.get("bits", 8))
    lo, hi = code_range(bits)
    _check_grids(doc["scale"], doc["zero_point"], bits, shape)
    feats = doc["features"]
    if not isinstance(feats, list) or len(feats) != math.prod(shape):
        got = len(feats) if isinstance(feats, list) else type(feats).__name__
        raise WireError(f"features must be a flat list of {math.prod(shape)} int8 codes for shape {shape}, got {got}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in feats):
        raise WireError(f"features must be integers in [{lo}, {hi}] ({bits}-bit codes)")
    q = np.asarray(feats, dtype=np.int8).reshape(shape)
    return Message(q, doc["scale"], doc["zero_point"], _check_sha(doc["encoder_sha256"]), bits)


def loads_json(body: bytes) -> Message:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"body is not valid JSON ({e.__class__.__name__}: {str(e)[:80]})") from None
    return from_json(doc)
