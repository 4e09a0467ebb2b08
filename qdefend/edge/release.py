"""What crosses the wire: the release steps and the wire grid, in one table.

A device sends ``wire(release(encoder(x)))``: the encoder's float features, transformed by the
run's release steps in order (``manifest["release"]["steps"]``, e.g. ``[{"type":
"gaussian_noise", "sigma": 0.1}]``), then quantised onto the grid ``manifest["features"]["wire"]``
(int8 codes of 2..8 bits, per tensor or per channel; ``wire_then_release`` quantises before the
steps too: see "the wire grid" below). Every consumer looks the step up in :data:`STEP_TYPES` here:

* the device runtime applies the **numpy** function (:func:`apply_release`);
* training, torch attack targets and noise-aware attackers apply its **torch twin**
  (:func:`torch_release`; the defenses call the same per-parameter functions, e.g.
  :func:`gaussian_noise_torch`), so a simulated release is the one a device sends;
* manifest validation checks its **parameters** (:func:`check_steps`), and the wire grid widens by
  its **noise std** and **range shift** (:func:`wire_quant_params`).

Adding a step type is one :class:`StepType` entry here, its defense and a parity test.

=================  =========================  ==============================================
type               parameters                 what it does
=================  =========================  ==============================================
gaussian_noise     sigma >= 0                 z + sigma * N(0, 1)  (noise, CEM's noise floor)
laplace_noise      scale >= 0                 z + Laplace(0, scale)  (std sqrt(2) scale; LDP)
dropout            p in [0, 1]                zero each element w.p. p, no 1/(1-p) rescaling
topk_prune         ratio in [0, 1]            zero the round(ratio D) smallest-|z| per sample
additive_noise     tensors: K lists of D      z + one of K learned tensors, drawn uniformly
vib_sample         log_sigma, mask: D values  mask * (z + exp(log_sigma) * N(0, 1))
=================  =========================  ==============================================

This file is copied as-is into device bundles: it imports the standard library at the top,
numpy inside the numpy functions and torch only inside the torch twins.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

try:
    from .errors import ArtifactError
except ImportError:  # copied flat into a device bundle
    from errors import ArtifactError

__all__ = [
    "StepType", "STEP_TYPES", "WIRE_SIGMAS", "check_steps", "check_grid", "apply_release", "torch_release", "noise_std",
    "random_release", "int8_params", "grid_params", "code_range", "wire_quant_params", "quantize", "dequantize",
    "wire_torch", "wire_quantize", "wire_dequantize", "to_wire", "release_torch_to_wire", "check_wire",
    "wire_bits", "wire_granularity", "wire_order", "wire_with_defaults",
    "WIRE_BITS", "WIRE_GRANULARITIES", "WIRE_ORDERS",
    "gaussian_noise_torch", "laplace_noise_torch", "dropout_torch", "topk_prune_torch", "pruned_count",
    "additive_noise_torch", "vib_sample_torch", "unit_view_torch",
]

WIRE_SIGMAS = 4.0  # the wire range covers the encoder output range widened by this many noise stds


def _is_num(v: Any) -> bool:  # also the manifest's
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fail(key: str, what: str) -> None:  # also the manifest's: every message names the bad key
    raise ArtifactError(f"manifest key '{key}' {what}: fix the exporter or re-export with `qdefend export RUN`")


def _param(step: dict, key: str) -> float:
    if key not in step:
        raise ArtifactError(f"release step {step!r} needs '{key}': fix release.steps in the manifest")
    return float(step[key])


def pruned_count(ratio: float, per_sample: int) -> int:
    """How many elements of a sample topk_prune zeroes: round(ratio * D)."""
    return int(round(float(ratio) * per_sample))


# ------------------------------------------------------------------------------- torch twins
# Per-parameter functions, differentiable in z: the defenses call them with their (possibly
# learned) parameters, the table's adapters with a manifest step's.


def gaussian_noise_torch(z, sigma: float, generator=None):
    """z + sigma * N(0, 1) per element (z unchanged for sigma 0)."""
    import torch

    if sigma == 0:
        return z
    return z + sigma * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


def laplace_noise_torch(z, scale: float, generator=None):
    """z + Laplace(0, scale) per element, drawn as scale * (E1 - E2) with E1, E2 ~ Exp(1): finite
    for every uniform draw (an inverse-CDF sampler hits log(0) once in 2^24 float32 draws)."""
    import torch

    if scale == 0:
        return z
    e = torch.empty((2, *z.shape), device=z.device, dtype=z.dtype).exponential_(generator=generator)
    return z + scale * (e[0] - e[1])


def dropout_torch(z, p: float, generator=None):
    """z with each element zeroed with probability p (kept where U[0,1) >= p), no rescaling."""
    import torch

    if p == 0:
        return z
    keep = torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype) >= p
    return z * keep.to(z.dtype)


def topk_prune_torch(z, ratio: float):
    """z with the round(ratio * D) smallest-|z| elements of each sample set to zero (ties: the
    lower index first, as a stable sort)."""
    import torch

    flat = z.reshape(len(z), -1)
    k = pruned_count(ratio, flat.shape[1])
    if k == 0 or flat.numel() == 0:
        return z
    idx = torch.sort(flat.detach().abs(), dim=1, stable=True).indices[:, :k]
    return flat.scatter(1, idx, 0.0).reshape(z.shape)


def additive_noise_torch(z, bank, generator=None):
    """z + bank[i] per sample, i uniform over the K tensors of ``bank`` (K, *feature_shape); no draw
    for K = 1."""
    import torch

    bank = bank.to(device=z.device, dtype=z.dtype)
    if len(bank) == 1:
        return z + bank[0]
    idx = torch.randint(len(bank), (len(z),), generator=generator, device=z.device)
    return z + bank[idx]


def unit_view_torch(t, feature_shape):
    """A flat per-unit tensor as a broadcastable view of one sample's features: C*H*W values ->
    (C, H, W); C values -> (C, 1, 1) (the numpy rule of :func:`_vib_view`)."""
    feature_shape = tuple(feature_shape)
    if t.numel() == math.prod(feature_shape):
        return t.reshape(feature_shape)
    if feature_shape and t.numel() == feature_shape[0]:
        return t.reshape(feature_shape[0], *[1] * (len(feature_shape) - 1))
    raise ArtifactError(f"vib_sample has {t.numel()} values per tensor, features {feature_shape} need "
                        f"{math.prod(feature_shape)} (per element) or {feature_shape[0]} (per channel): re-export the run")


def vib_sample_torch(z, log_sigma, mask, generator=None, eps=None):
    """mask * (z + exp(log_sigma) * eps), eps ~ N(0, 1) drawn from ``generator`` unless given;
    log_sigma and mask broadcast over the batch."""
    if eps is None:
        import torch

        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return mask * (z + log_sigma.exp() * eps)


# ------------------------------------------------------------------------------- numpy (edge)


def _gaussian_np(z, step, rng):
    import numpy as np

    sigma = _param(step, "sigma")
    return z + np.float32(sigma) * rng.standard_normal(z.shape, dtype=np.float32) if sigma else z


def _laplace_np(z, step, rng):
    import numpy as np

    b = _param(step, "scale")
    return (z + rng.laplace(0.0, b, z.shape)).astype(np.float32) if b else z


def _dropout_np(z, step, rng):
    import numpy as np

    p = _param(step, "p")
    return z * (rng.random(z.shape, dtype=np.float32) >= p) if p else z


def _topk_np(z, step, rng):
    import numpy as np

    flat = z.reshape(len(z), -1)
    k = pruned_count(_param(step, "ratio"), flat.shape[1])
    if k == 0 or flat.size == 0:
        return z
    out = flat.copy()
    order = np.argsort(np.abs(flat), axis=1, kind="stable")[:, :k]  # ties as the torch twin
    np.put_along_axis(out, order, 0.0, axis=1)
    return out.reshape(z.shape)


def _additive_np(z, step, rng):
    import numpy as np

    bank = np.asarray(step["tensors"], np.float32)
    if bank.ndim != 2 or bank.shape[1] != int(np.prod(z.shape[1:])):
        raise ArtifactError(f"additive_noise tensors {bank.shape} do not match features {z.shape}: re-export the run")
    idx = rng.integers(len(bank), size=len(z)) if len(bank) > 1 else np.zeros(len(z), np.int64)
    return (z + bank[idx].reshape(z.shape)).astype(np.float32)


def _vib_view(step: dict, key: str, shape: tuple):
    """A vib_sample list as a view of one sample's features: C*H*W values -> (C, H, W), C -> (C, 1, 1)."""
    import numpy as np

    t, feat = np.asarray(step[key], np.float32), tuple(shape[1:])
    if t.ndim == 1 and t.size == int(np.prod(feat)):
        return t.reshape(feat)
    if t.ndim == 1 and feat and t.size == feat[0]:
        return t.reshape(feat[0], *[1] * (len(feat) - 1))
    raise ArtifactError(f"vib_sample {key} has {t.size} values, features {tuple(shape)} need "
                        f"{int(np.prod(feat))} (per element) or {feat[0] if feat else 1} (per channel): re-export the run")


def _vib_np(z, step, rng):
    import numpy as np

    log_sigma, mask = _vib_view(step, "log_sigma", z.shape), _vib_view(step, "mask", z.shape)
    eps = rng.standard_normal(z.shape, dtype=np.float32)
    return (mask * (z + np.exp(log_sigma) * eps)).astype(np.float32)


# ------------------------------------------------------------------------ the table's adapters


def _scalar_check(param: str, lo: float, hi: float):
    def check(step: dict, key: str) -> None:
        v = step.get(param)
        if not (_is_num(v) and lo <= v <= hi):
            _fail(f"{key}.{param}", f"must be a number in [{lo}, {hi}] for {step['type']}, got {v!r}")
    return check


def _check_additive(step: dict, key: str) -> None:
    v = step.get("tensors")
    ok = isinstance(v, list) and v and all(isinstance(t, list) and t and len(t) == len(v[0]) and
                                           all(_is_num(x) for x in t) for t in v)
    if not ok:
        _fail(f"{key}.tensors", "must be a non-empty list of equal-length lists of finite numbers")


VIB_LOG_SIGMA_RANGE = (-30.0, 30.0)


def _check_vib(step: dict, key: str) -> None:
    lo, hi = VIB_LOG_SIGMA_RANGE
    v = step.get("log_sigma")
    if not (isinstance(v, list) and v and all(_is_num(x) and lo <= x <= hi for x in v)):
        _fail(f"{key}.log_sigma", f"must be a non-empty list of numbers in [{lo}, {hi}]")
    mask = step.get("mask")
    if not (isinstance(mask, list) and len(mask) == len(v) and all(_is_num(x) and x in (0, 1) for x in mask)):
        _fail(f"{key}.mask", f"must be a list of {len(v)} zeros and ones (one per log_sigma value)")


def _additive_fits(step: dict, shape: list, key: str) -> None:
    if len(step["tensors"][0]) != math.prod(shape):
        _fail(f"{key}.tensors", f"hold {len(step['tensors'][0])} values each, features {shape} need {math.prod(shape)}")


def _vib_fits(step: dict, shape: list, key: str) -> None:
    per_element, channels = math.prod(shape), shape[0]
    if len(step["log_sigma"]) not in (per_element, channels):
        _fail(f"{key}.log_sigma", f"has {len(step['log_sigma'])} values, features {shape} "
              f"need {per_element} (per element) or {channels} (per channel)")


def _additive_torch_step(z, step, generator=None):
    import torch

    bank = torch.tensor(step["tensors"], dtype=z.dtype, device=z.device)
    if bank.ndim != 2 or bank.shape[1] != math.prod(z.shape[1:]):
        raise ArtifactError(f"additive_noise tensors {tuple(bank.shape)} do not match features {tuple(z.shape)}: "
                            "re-export the run")
    return additive_noise_torch(z, bank.reshape(len(bank), *z.shape[1:]), generator)


def _vib_torch_step(z, step, generator=None):
    import torch

    log_sigma, mask = (unit_view_torch(torch.tensor(step[k], dtype=z.dtype, device=z.device), z.shape[1:])
                       for k in ("log_sigma", "mask"))
    return vib_sample_torch(z, log_sigma, mask, generator)


def _additive_shift(step: dict) -> tuple[float, float]:
    t = step["tensors"]
    return min(0.0, min(min(r) for r in t)), max(0.0, max(max(r) for r in t))


@dataclass(frozen=True)
class StepType:
    """One kind of release step: how to check, apply (numpy and torch) and bound it."""

    name: str
    params: tuple[str, ...]  # the manifest keys it reads
    check: Callable[[dict, str], None]  # (step, manifest key) -> None or ArtifactError
    numpy: Callable  # (z float32 (N, ...), step, numpy Generator) -> z'
    torch: Callable  # (z tensor, step, torch.Generator | None) -> z', differentiable in z
    noise_std: Callable[[dict], float] = lambda step: 0.0  # per-element std of the noise it adds
    random: Callable[[dict], bool] = lambda step: False  # whether it draws fresh randomness
    shift: Callable[[dict], tuple[float, float]] = lambda step: (0.0, 0.0)  # how far it moves the range
    fits: Callable[[dict, list, str], None] = lambda step, shape, key: None  # (step, feature shape, key)


STEP_TYPES: dict[str, StepType] = {s.name: s for s in (
    StepType("gaussian_noise", ("sigma",), _scalar_check("sigma", 0.0, math.inf), _gaussian_np,
             lambda z, s, g=None: gaussian_noise_torch(z, float(s["sigma"]), g),
             noise_std=lambda s: float(s["sigma"]), random=lambda s: float(s["sigma"]) > 0),
    StepType("laplace_noise", ("scale",), _scalar_check("scale", 0.0, math.inf), _laplace_np,
             lambda z, s, g=None: laplace_noise_torch(z, float(s["scale"]), g),
             noise_std=lambda s: math.sqrt(2) * float(s["scale"]), random=lambda s: float(s["scale"]) > 0),
    StepType("dropout", ("p",), _scalar_check("p", 0.0, 1.0), _dropout_np,
             lambda z, s, g=None: dropout_torch(z, float(s["p"]), g), random=lambda s: float(s["p"]) > 0),
    StepType("topk_prune", ("ratio",), _scalar_check("ratio", 0.0, 1.0), _topk_np,
             lambda z, s, g=None: topk_prune_torch(z, float(s["ratio"]))),
    StepType("additive_noise", ("tensors",), _check_additive, _additive_np, _additive_torch_step,
             random=lambda s: len(s["tensors"]) > 1, shift=_additive_shift, fits=_additive_fits),
    StepType("vib_sample", ("log_sigma", "mask"), _check_vib, _vib_np, _vib_torch_step,
             noise_std=lambda s: max((math.exp(v) for v, m in zip(s["log_sigma"], s["mask"]) if m), default=0.0),
             random=lambda s: any(m > 0 for m in s["mask"]), fits=_vib_fits),
)}


def _type(step: Any) -> StepType:
    st = STEP_TYPES.get(step.get("type") if isinstance(step, dict) else None)
    if st is None:
        raise ArtifactError(f"unknown release step type {step.get('type') if isinstance(step, dict) else step!r}; "
                            f"known: {', '.join(STEP_TYPES)} (upgrade qdefend or re-export)")
    return st


def check_steps(steps: Any, key: str = "release.steps") -> None:
    """Validate a list of release steps; ArtifactError names the first bad manifest key."""
    if not isinstance(steps, list):
        _fail(key, "must be a list of {'type': ..., param: value}")
    for i, step in enumerate(steps):
        k = f"{key}[{i}]"
        kind = step.get("type") if isinstance(step, dict) else None
        if kind not in STEP_TYPES:
            _fail(f"{k}.type", f"must be one of {', '.join(STEP_TYPES)}, got {kind!r}")
        STEP_TYPES[kind].check(step, k)


def apply_release(z, steps: list[dict], rng):
    """The release steps in order on float features z (N, ...), numpy (what a device runs)."""
    import numpy as np

    z = np.asarray(z, np.float32)
    for step in steps:
        z = _type(step).numpy(z, step, rng).astype(np.float32, copy=False)
    return z


def torch_release(z, steps: list[dict], generator=None):
    """The release steps in order on a torch tensor z, differentiable in z (the torch twins)."""
    for step in steps:
        z = _type(step).torch(z, step, generator)
    return z


def noise_std(steps: list[dict]) -> float:
    """The per-element std of the noise the steps add (independent noises add in quadrature)."""
    return math.sqrt(sum(_type(s).noise_std(s) ** 2 for s in steps))


def random_release(steps: list[dict]) -> bool:
    """Whether the steps draw fresh randomness per query (noise, dropout, a drawn tensor)."""
    return any(_type(s).random(s) for s in steps)


# ------------------------------------------------------------------------------- the wire grid
# A wire grid is the manifest's ``features.wire``: {"dtype": "int8", "bits": B, "granularity":
# "tensor" | "channel", "order": ORDER, "scale": s, "zero_point": zp}, with one scale and zero point
# per channel (axis 1) when granularity is "channel". Codes are signed B-bit integers in
# [-2^(B-1), 2^(B-1) - 1], held in int8; the wire message bit-packs them (qdefend.edge.wire).
# ORDER says where the quantiser sits relative to the release steps:
#   release_then_wire   q = Q(release(z))         noise first, the grid widened to hold it (default)
#   wire_then_release   q = Q(release(Q(z)))      the encoder's output quantised first, the release's
#                                                 output put back on the same grid (clipped)

WIRE_BITS = (2, 3, 4, 5, 6, 7, 8)
WIRE_GRANULARITIES = ("tensor", "channel")
WIRE_ORDERS = ("release_then_wire", "wire_then_release")
DEFAULT_ORDER = "release_then_wire"


def code_range(bits: int = 8) -> tuple[int, int]:
    """The signed codes of a `bits`-bit wire: (-2^(bits-1), 2^(bits-1) - 1)."""
    return -(1 << (int(bits) - 1)), (1 << (int(bits) - 1)) - 1


def quantize(z, scale: float, zero_point: int, dtype: Any = None, bits: int = 8):
    """Affine quantisation as torch's quantize_per_tensor: clip(round_half_even(z * (1/s)) + zp),
    clipped to the `bits`-bit codes. ``scale``/``zero_point`` may be arrays that broadcast over z
    (a per-channel grid: :func:`wire_quantize`)."""
    import numpy as np

    dtype = np.int8 if dtype is None else dtype
    info = np.iinfo(dtype)
    lo, hi = code_range(bits) if bits < 8 else (info.min, info.max)
    inv = (1.0 / np.asarray(scale, np.float64)).astype(np.float32)
    q = np.rint(np.asarray(z, np.float32) * inv) + np.asarray(zero_point, np.float32)
    return np.clip(q, lo, hi).astype(dtype)


def dequantize(q, scale: float, zero_point: int):
    """(q - zp) * s in float32, as torch's dequantize_per_tensor (arrays broadcast as in quantize)."""
    import numpy as np

    return ((np.asarray(q).astype(np.float32) - np.asarray(zero_point, np.float32))
            * np.asarray(scale, np.float32))


def wire_bits(wire: dict) -> int:
    return int(wire.get("bits", 8))


def wire_granularity(wire: dict | None) -> str:
    return (wire or {}).get("granularity", "tensor")


def wire_order(wire: dict | None) -> str:
    return (wire or {}).get("order", DEFAULT_ORDER)


def wire_with_defaults(wire: dict) -> dict:
    """A ``features.wire`` with the keys older manifests leave out (bits, granularity, order)
    spelled out, so that two equal grids compare equal as dicts."""
    return {**wire, "bits": wire_bits(wire), "granularity": wire_granularity(wire), "order": wire_order(wire)}


def _channel_view(v, ndim: int):
    """A per-channel list as an array that broadcasts over (N, C, ...); a scalar as itself."""
    import numpy as np

    a = np.asarray(v, np.float64)
    return a.reshape(1, -1, *[1] * (ndim - 2)) if a.ndim == 1 else a


def wire_quantize(z, wire: dict):
    """Float features (N, C, ...) -> int8 codes on the wire grid (any bit-width, per tensor or channel)."""
    import numpy as np

    z = np.asarray(z, np.float32)
    s, zp = _channel_view(wire["scale"], z.ndim), _channel_view(wire["zero_point"], z.ndim)
    return quantize(z, s, zp, bits=wire_bits(wire))


def wire_dequantize(q, wire: dict):
    """int8 codes on the wire grid -> the float32 features the cloud side sees."""
    import numpy as np

    q = np.asarray(q)
    return dequantize(q, _channel_view(wire["scale"], q.ndim), _channel_view(wire["zero_point"], q.ndim))


def to_wire(z, steps: list[dict], wire: dict, rng, release: bool = True):
    """What a device sends for encoder outputs z (N, ...): the release steps and the wire quantiser
    in the grid's order (numpy). ``release=False`` puts the bare output on the grid."""
    import numpy as np

    z = np.asarray(z, np.float32)
    if release:
        if wire_order(wire) == "wire_then_release":
            z = wire_dequantize(wire_quantize(z, wire), wire)
        z = apply_release(z, steps, rng)
    return wire_quantize(z, wire)


def wire_torch(z, wire: dict | None):
    """Torch twin of quantise-then-dequantise onto the wire grid (round half to even, as np.rint;
    float32 arithmetic; any bit-width, per tensor or channel), so a simulated release lands on
    exactly the values a device sends."""
    if wire is None:
        return z
    import numpy as np
    import torch

    def view(v, dtype):
        t = torch.as_tensor(np.asarray(v, dtype), device=z.device)
        return t.reshape(1, -1, *[1] * (z.dim() - 2)) if t.dim() == 1 else t

    lo, hi = code_range(wire_bits(wire))
    inv = view((1.0 / np.asarray(wire["scale"], np.float64)), np.float32)
    s, zp = view(wire["scale"], np.float32), view(wire["zero_point"], np.float32)
    return ((torch.clamp(torch.round(z.float() * inv) + zp, lo, hi) - zp) * s).to(z.dtype)


def release_torch_to_wire(z, release_fn: Callable, wire: dict | None, generator=None):
    """The torch twin of :func:`to_wire`, dequantised: ``release_fn(z, generator)`` and the wire
    quantiser in the grid's order (``wire`` None: the release alone, float)."""
    if wire is not None and wire_order(wire) == "wire_then_release":
        z = wire_torch(z, wire)
    return wire_torch(release_fn(z, generator), wire)


def grid_params(low: float, high: float, bits: int = 8) -> dict:
    """Asymmetric `bits`-bit {"dtype", "bits", "scale", "zero_point"} covering [low, high] (widened to hold 0)."""
    qmin, qmax = code_range(bits)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = (high - low) / (qmax - qmin) if high > low else 1.0
    zero_point = int(min(qmax, max(qmin, round(qmin - low / scale))))
    return {"dtype": "int8", "bits": int(bits), "scale": scale, "zero_point": zero_point}


def int8_params(low: float, high: float) -> dict:
    """Asymmetric int8 {"dtype", "bits", "scale", "zero_point"} covering [low, high] (widened to hold 0)."""
    return grid_params(low, high, 8)


def check_grid(q: Any, key: str) -> None:
    """Validate an int8 grid {"scale": > 0, "zero_point": int}; ArtifactError names the bad key."""
    if not isinstance(q, dict):
        _fail(key, f"must be {{'scale': float, 'zero_point': int}}, got {q!r}")
    if not (_is_num(q.get("scale")) and q["scale"] > 0):
        _fail(f"{key}.scale", f"must be a positive number, got {q.get('scale')!r}")
    if not (isinstance(q.get("zero_point"), int) and not isinstance(q["zero_point"], bool)):
        _fail(f"{key}.zero_point", f"must be an integer, got {q.get('zero_point')!r}")


def check_wire(w: Any, key: str = "features.wire", channels: int | None = None) -> None:
    """Validate a wire grid (any bit-width, per tensor or per channel, its order); ArtifactError
    names the bad key. ``channels``: the feature map's channel count a per-channel grid must match."""
    if not isinstance(w, dict):
        _fail(key, f"must be {{'dtype': 'int8', 'bits', 'scale', 'zero_point'}}, got {w!r}")
    if w.get("dtype") != "int8":
        _fail(f"{key}.dtype", f"must be 'int8' (codes travel in int8, bit-packed below 8 bits), got {w.get('dtype')!r}")
    bits = w.get("bits", 8)
    if isinstance(bits, bool) or bits not in WIRE_BITS:
        _fail(f"{key}.bits", f"must be one of {', '.join(map(str, WIRE_BITS))}, got {bits!r}")
    gran = wire_granularity(w)
    if gran not in WIRE_GRANULARITIES:
        _fail(f"{key}.granularity", f"must be one of {', '.join(WIRE_GRANULARITIES)}, got {gran!r}")
    if w.get("order", DEFAULT_ORDER) not in WIRE_ORDERS:
        _fail(f"{key}.order", f"must be one of {', '.join(WIRE_ORDERS)}, got {w.get('order')!r}")
    qmin, qmax = code_range(bits)
    scales, zps = w.get("scale"), w.get("zero_point")
    if gran == "channel":
        if not (isinstance(scales, list) and isinstance(zps, list) and scales and len(scales) == len(zps)):
            _fail(key, "is per channel: scale and zero_point must be lists of one value per channel, of equal length")
        if channels is not None and len(scales) != channels:
            _fail(f"{key}.scale", f"has {len(scales)} channels, the features have {channels}")
    else:
        scales, zps = [scales], [zps]
    for s_, z_ in zip(scales, zps):
        if not (_is_num(s_) and s_ > 0):
            _fail(f"{key}.scale", f"must be positive numbers, got {s_!r}")
        if isinstance(z_, bool) or not isinstance(z_, int) or not qmin <= z_ <= qmax:
            _fail(f"{key}.zero_point", f"must be integers in [{qmin}, {qmax}] for {bits} bits, got {z_!r}")


def _plain_steps(steps) -> list:
    """Steps as plain JSON values (numpy scalars and arrays become floats and lists)."""
    try:
        return json.loads(json.dumps(list(steps), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o),
                                     allow_nan=False))
    except ValueError as e:
        raise ArtifactError(f"release steps cannot be written as JSON ({e}): pass finite numbers") from None


def wire_quant_params(out_quant: dict | None, steps: list, value_range: list | tuple | None = None) -> dict:
    """The int8 grid released features travel on.

    Covers the encoder output range (`value_range`, e.g. [0, 1] after a sigmoid, else the range
    of the output grid `out_quant`) widened by 4 standard deviations of the release noise (noise
    steps add in quadrature) and by the steps' range shifts (a learned additive tensor's extremes),
    so noisy features do not clip: sigmoid [0, 1] with sigma 0.1 -> [-0.4, 1.4]. Without noise and
    with an int8 output grid, the wire *is* that grid, so the artifact's int8 output is sent
    unchanged.
    """
    steps = _plain_steps(steps)
    check_steps(steps, "release.steps")
    std = noise_std(steps)
    if out_quant is not None:
        check_grid(out_quant, "out_quant")
    if std == 0 and out_quant is not None and -128 <= out_quant["zero_point"] <= 127:
        return {"dtype": "int8", "bits": 8, "granularity": "tensor", "order": DEFAULT_ORDER,
                "scale": float(out_quant["scale"]), "zero_point": int(out_quant["zero_point"])}
    if value_range is not None:
        low, high = (float(v) for v in value_range)
    elif out_quant is not None:
        s, zp = out_quant["scale"], out_quant["zero_point"]
        low, high = (-128 - zp) * s, (127 - zp) * s
    else:
        raise ArtifactError("wire_quant_params needs the encoder output range: pass value_range=[low, "
                            "high] (e.g. the observed min/max) or the output quant params")
    for s in steps:
        lo_shift, hi_shift = _type(s).shift(s)
        low, high = low + lo_shift, high + hi_shift
    return {**int8_params(low - WIRE_SIGMAS * std, high + WIRE_SIGMAS * std), "granularity": "tensor",
            "order": DEFAULT_ORDER}
