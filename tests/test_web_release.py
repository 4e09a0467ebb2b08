"""The browser twin qdefend/serve/web/release.js against the numpy release (qdefend/edge/release.py).

Each test writes its cases as JSON (arrays as base64 bytes), runs them through release.js in Node
with a small driver, and compares with numpy: quantisation and normalisation bit for bit, the
deterministic steps exactly, the random steps twice: replaying the draws the JS made through the
numpy functions themselves (same semantics, draw for draw), and by their statistics from the JS's
own seeded generator (the right distributions).
"""

import base64
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qdefend.edge import wire
from qdefend.edge.release import (apply_release, code_range, dequantize, grid_params, pruned_count, quantize,
                                  to_wire, wire_dequantize, wire_quantize)

RELEASE_JS = Path(__file__).resolve().parents[1] / "qdefend" / "serve" / "web" / "release.js"

DRIVER = """
import * as R from RELEASE_URL;
import { readFileSync, writeFileSync } from "node:fs";

const TYPES = { float32: Float32Array, float64: Float64Array, int8: Int8Array, uint8: Uint8Array };
const dec = (v) => {
  if (Array.isArray(v)) return v.map(dec);
  if (v && typeof v === "object" && "b64" in v) return new TYPES[v.dtype](Uint8Array.from(Buffer.from(v.b64, "base64")).buffer);
  return v;
};
const enc = (a) => ({ dtype: Object.keys(TYPES).find((k) => a instanceof TYPES[k]),
                      b64: Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString("base64") });

function rngFor(spec) {  // {seed}: makeRng(seed); {u: [..], n: [..]}: these draws, cycled; both record their draws
  let iu = 0, i_n = 0;
  const r = "seed" in spec ? R.makeRng(spec.seed)
    : { uniform: () => spec.u[iu++ % spec.u.length], normal: () => spec.n[i_n++ % spec.n.length] };
  const u = [], n = [];
  return { rng: { uniform: () => { const v = r.uniform(); u.push(v); return v; },
                  normal: () => { const v = r.normal(); n.push(v); return v; } }, u, n };
}

const ops = {
  quantize: (z, s, zp, bits) => ({ out: enc(R.quantize(z, s, zp, bits)) }),
  wire_quantize: (z, dims, wire) => ({ out: enc(R.wireQuantize(z, dims, wire)) }),
  wire_dequantize: (q, dims, wire) => ({ out: enc(R.wireDequantize(q, dims, wire)) }),
  to_wire: (z, dims, steps, wire, spec, release) => {
    const { rng, u, n } = rngFor(spec);
    const out = R.toWire(z, dims, steps, wire, rng, release);
    return { out: enc(out), uniforms: enc(Float64Array.from(u)), normals: enc(Float64Array.from(n)) };
  },
  pack_bits: (q, bits) => ({ out: enc(R.packBits(q, bits)) }),
  unpack_bits: (buf, n, bits) => ({ out: enc(R.unpackBits(buf, n, bits)) }),
  pack_message: (q, dims, wire, sha) => ({ out: enc(R.packMessage(q, dims, wire, sha)) }),
  dequantize: (q, s, zp) => ({ out: enc(R.dequantize(q, s, zp)) }),
  normalize: (px, ch, mean, std) => ({ out: enc(R.normalize(px, ch, mean, std)) }),
  release: (z, perSample, steps, spec) => {
    const { rng, u, n } = rngFor(spec);
    const out = R.applyRelease(z, perSample, steps, rng);
    return { out: enc(out), uniforms: enc(Float64Array.from(u)), normals: enc(Float64Array.from(n)) };
  },
  rng: (seed, count) => {
    const r = seed === null ? R.makeRng() : R.makeRng(seed);
    return { uniforms: enc(Float64Array.from({ length: count }, r.uniform)),
             normals: enc(Float64Array.from({ length: count }, r.normal)) };
  },
};

const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const results = cases.map(([op, ...args]) => {
  try { return ops[op](...dec(args)); } catch (e) { return { error: String(e.message) }; }
});
writeFileSync(process.argv[3], JSON.stringify(results));
"""


@pytest.fixture(scope="module")
def node():
    exe = shutil.which("node")
    if exe is None:
        pytest.fail("node is not on PATH: install nodejs >= 20 (e.g. `apt-get install nodejs`) to test "
                    "qdefend/serve/web/release.js against the numpy release")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    if major < 20:
        pytest.fail(f"node {version} is too old for release.js: install nodejs >= 20")
    # release.js is an ES module: qdefend/serve/web/package.json says "type": "module"
    return exe


@pytest.fixture
def js(node, tmp_path):
    """js(cases) -> results: each case is [op, *args] (numpy arrays travel as their bytes)."""
    exe = node
    driver = tmp_path / "driver.mjs"
    driver.write_text(DRIVER.replace("RELEASE_URL", json.dumps(RELEASE_JS.as_uri())))

    def enc(v):
        if isinstance(v, np.ndarray):
            return {"dtype": v.dtype.name, "b64": base64.b64encode(np.ascontiguousarray(v).tobytes()).decode()}
        return [enc(x) for x in v] if isinstance(v, (list, tuple)) else v

    def dec(v):
        if isinstance(v, dict) and "b64" in v:
            return np.frombuffer(base64.b64decode(v["b64"]), v["dtype"])
        return {k: dec(x) for k, x in v.items()} if isinstance(v, dict) else v

    def run(cases):
        (tmp_path / "in.json").write_text(json.dumps([enc(list(c)) for c in cases]))
        p = subprocess.run([exe, str(driver), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"node failed:\n{p.stderr}"
        return [dec(r) for r in json.loads((tmp_path / "out.json").read_text())]

    return run


def assert_same(got, want):
    """Bit-for-bit float32 equality, NaNs equal, and the sign of zeros included."""
    want = np.asarray(want, np.float32).ravel()
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def assert_close(got, want):
    """Equal up to float32 rounding of exp and log: numpy's SIMD float32 exp is not correctly
    rounded while JS rounds the float64 Math.exp (they differ by an ulp on ~40% of inputs), and
    libm's and V8's float64 log may differ in the last bit. On O(1) features an ulp of an O(1)
    operand is ~1e-7, so 1e-6 absolute (after cancellation in z + sigma * eps) is ample, while any
    difference in semantics moves values by the noise scale (>= 0.05 here)."""
    np.testing.assert_allclose(got, np.asarray(want, np.float32).ravel(), rtol=1e-6, atol=1e-6)


class Replay:
    """A numpy Generator stand-in that hands the numpy release functions the JS's draws in order:
    uniforms for random/integers/laplace, normals for standard_normal (the JS draws per element,
    row-major, as numpy fills an array; laplace as scale * (E1 - E2), E = -log(1 - U))."""

    def __init__(self, uniforms, normals):
        self.u, self.n, self.iu, self.i_n = uniforms, normals, 0, 0

    def _u(self, k):
        self.iu += k
        assert self.iu <= len(self.u), "numpy wants more uniforms than the JS drew"
        return self.u[self.iu - k:self.iu]

    def standard_normal(self, shape, dtype=np.float64):
        k = math.prod(shape)
        self.i_n += k
        assert self.i_n <= len(self.n), "numpy wants more normals than the JS drew"
        return self.n[self.i_n - k:self.i_n].astype(dtype).reshape(shape)

    def random(self, shape, dtype=np.float64):
        return self._u(math.prod(shape)).astype(dtype).reshape(shape)

    def integers(self, high, size):
        return np.minimum(high - 1, np.floor(self._u(size) * high)).astype(np.int64)

    def laplace(self, loc, scale, shape):
        e = -np.log(1 - self._u(2 * math.prod(shape)))
        return loc + scale * (e[0::2] - e[1::2]).reshape(shape)

    def done(self):
        return self.iu == len(self.u) and self.i_n == len(self.n)


# ------------------------------------------------------------------------------- wire grid


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_quantize_dequantize_bit_identical(js):
    rng = np.random.default_rng(0)
    grids = [(0.125, 0), (1 / 255, -128), (0.0123, 7), (3.7, -3), (1e-4, 127), (0.05, 17)]
    cases, want = [], []
    for scale, zp in grids:  # (3e38 etc. overflow to inf in z * inv, as they may on a device)
        inv = np.float32(1.0 / scale)
        k = rng.integers(-140, 140, 6000).astype(np.float32)
        ties = (k + np.float32(0.5)) / inv  # z * inv lands on (or next to) a .5 tie of the grid
        z = np.concatenate([
            rng.normal(0, 60 * scale, 6000), ties, np.nextafter(ties, np.float32(np.inf)),
            np.nextafter(ties, np.float32(-np.inf)), (k + np.float32(0.5)) * np.float32(scale),
            rng.uniform(-1e6, 1e6, 500) * scale, [1e30, -1e30, 3e38, -3e38, np.inf, -np.inf, 0.0, -0.0],
        ]).astype(np.float32)
        if scale == 0.125:  # 1 / scale exact: the products are exact ties
            assert np.any(np.abs(z * inv - np.floor(z * inv)) == 0.5)
        q = quantize(z, scale, zp)
        codes = np.arange(-128, 128, dtype=np.int8)
        cases += [("quantize", z, scale, zp), ("dequantize", codes, scale, zp), ("dequantize", q, scale, zp)]
        want += [q, dequantize(codes, scale, zp), dequantize(q, scale, zp)]
    assert sum(len(c[1]) for c in cases[::3]) > 100_000
    for (op, *_), got, w in zip(cases, js(cases), want):
        if op == "quantize":
            assert got["out"].dtype == np.int8
            np.testing.assert_array_equal(got["out"], w)
        else:
            assert_same(got["out"], w)


def wire_grid(bits, lows, highs, order="release_then_wire"):
    """A manifest features.wire: per tensor (one low/high) or per channel (lists), as release.grid_params."""
    if isinstance(lows, list):
        grids = [grid_params(lo, hi, bits) for lo, hi in zip(lows, highs)]
        return {"dtype": "int8", "bits": bits, "granularity": "channel", "order": order,
                "scale": [g["scale"] for g in grids], "zero_point": [g["zero_point"] for g in grids]}
    return {**grid_params(lows, highs, bits), "granularity": "tensor", "order": order}


def wire_cases(z, w):
    """Values on, next to and between the grid's ties, past its ends and infinite, per channel."""
    s = np.asarray(w["scale"], np.float64).reshape(1, -1, *[1] * (z.ndim - 2))
    inv = (1.0 / s).astype(np.float32)
    lo, hi = code_range(w["bits"])
    rng = np.random.default_rng(w["bits"])
    k = rng.integers(lo - 3, hi + 3, z.shape).astype(np.float32)
    ties = (k + np.float32(0.5)) / inv  # z * inv on (or next to) a .5 tie
    zs = [z, ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
          np.broadcast_to(np.float32(s) * (hi - lo) * 3, z.shape) * rng.uniform(-1, 1, z.shape)]
    out = np.concatenate([a.astype(np.float32) for a in zs])
    out.reshape(-1)[:4] = [np.inf, -np.inf, 0.0, -0.0]
    return out


def test_wire_quantize_every_bits_and_granularity_bit_identical(js):
    rng = np.random.default_rng(20)
    cases, want = [], []
    for bits in range(2, 9):
        for shape in [(6, 5, 3, 4), (9, 7)]:  # conv features (N, C, H, W) and flat (N, C)
            c = shape[1]
            lows, highs = rng.uniform(-3, 0.5, c), rng.uniform(0.1, 4, c)
            grids = [wire_grid(bits, float(lows[0]), float(highs[0])), wire_grid(bits, lows.tolist(), highs.tolist())]
            grids[1]["scale"][0] = 0.125  # 1 / scale exact: exact ties
            for w in grids:
                z = wire_cases((rng.normal(0, 2, shape)).astype(np.float32), w)
                codes = rng.integers(*np.add(code_range(bits), (0, 1)), z.shape).astype(np.int8)
                codes.reshape(-1)[:2] = code_range(bits)
                q = wire_quantize(z, w)
                dims = list(z.shape)
                cases += [("wire_quantize", z.ravel(), dims, w), ("wire_dequantize", codes.ravel(), dims, w),
                          ("wire_dequantize", q.ravel(), dims, w)]
                want += [q, wire_dequantize(codes, w), wire_dequantize(q, w)]
                if w["granularity"] == "tensor":  # release.quantize's bits argument
                    cases.append(("quantize", z.ravel(), w["scale"], w["zero_point"], bits))
                    want.append(quantize(z, w["scale"], w["zero_point"], bits=bits))
                lo, hi = code_range(bits)
                assert q.min() == lo and q.max() == hi  # both clip ends are exercised
    for (op, *_), got, w in zip(cases, js(cases), want):
        if op == "wire_dequantize":
            assert_same(got["out"], w)
        else:
            assert got["out"].dtype == np.int8
            np.testing.assert_array_equal(got["out"], np.ravel(w))


def test_to_wire_both_orders(js):
    """release.to_wire exactly: no steps, deterministic steps (top-k on the quantised ties, a fixed
    additive tensor), release off, and random steps through numpy on the JS's own draws."""
    rng = np.random.default_rng(21)
    shape = (12, 3, 2, 5)
    z = rng.normal(0, 1.5, shape).astype(np.float32)
    d = math.prod(shape[1:])
    runs = [([], {"seed": 0}), ([{"type": "topk_prune", "ratio": 0.4}], {"seed": 0}),
            ([{"type": "additive_noise", "tensors": rng.normal(0, 0.7, (1, d)).tolist()},
              {"type": "topk_prune", "ratio": 0.25}], {"seed": 0}),
            ([{"type": "gaussian_noise", "sigma": 0.4}, {"type": "dropout", "p": 0.3},
              {"type": "additive_noise", "tensors": rng.normal(0, 0.5, (3, d)).tolist()}], {"seed": 31})]
    cases, meta = [], []
    for bits in (2, 4, 8):
        grids = [wire_grid(bits, -4.0, 4.0), wire_grid(bits, [-3.0, -5.0, -1.0], [3.0, 2.0, 6.0])]
        for w0 in grids:
            for order in ("release_then_wire", "wire_then_release"):
                w = {**w0, "order": order}
                for steps, spec in runs:
                    for release in (True, False):
                        cases.append(("to_wire", z.ravel(), list(shape), steps, w, spec, release))
                        meta.append((steps, w, release))
    differ = 0
    for got, (steps, w, release) in zip(js(cases), meta):
        replay = Replay(got["uniforms"], got["normals"])
        want = to_wire(z, steps, w, replay, release=release)
        assert replay.done(), f"{steps}: the JS drew more than numpy uses"
        assert got["out"].dtype == np.int8
        np.testing.assert_array_equal(got["out"], want.ravel(), err_msg=f"{w} {steps} release={release}")
        if release and steps and not any(s["type"] == "gaussian_noise" for s in steps):
            other = {**w, "order": "wire_then_release" if w["order"] == "release_then_wire" else "release_then_wire"}
            differ += not np.array_equal(want, to_wire(z, steps, other, np.random.default_rng(0)))
    assert differ > 0  # the orders give different codes: the test tells them apart


def test_pack_bits_matches_numpy(js):
    rng = np.random.default_rng(22)
    cases, want = [], []
    for bits in range(2, 9):
        lo, hi = code_range(bits)
        for n in [*range(0, 18), 63, 64, 65, 1001]:  # n * bits not a multiple of 8 for most
            q = rng.integers(lo, hi + 1, n).astype(np.int8)
            q[:2] = [lo, hi][:n]
            packed = wire.pack_bits(q, bits)
            assert len(packed) == wire.payload_size(n, bits)
            cases += [("pack_bits", q, bits), ("unpack_bits", np.frombuffer(packed, np.uint8), n, bits)]
            want += [np.frombuffer(packed, np.uint8), wire.unpack_bits(packed, n, bits)]
    assert sum(len(c[1]) * c[2] % 8 != 0 for c in cases[::2]) > 50
    for (op, *_), got, w in zip(cases, js(cases), want):
        assert got["out"].dtype == (np.uint8 if op == "pack_bits" else np.int8)
        np.testing.assert_array_equal(got["out"], w)


def test_pack_message_matches_wire_pack(js):
    """packMessage (what qdefend.js POSTs) against wire.pack byte for byte: version 1 for an 8-bit
    per-tensor grid, version 2 (bit-packed, and/or per channel) for anything else."""
    rng = np.random.default_rng(23)
    sha = "0123456789abcdef" * 3 + "fedcba9876543210"
    cases, want = [], []
    for bits in range(2, 9):
        for shape in [(3, 4, 3, 3), (5, 7), (1, 2, 3, 1, 5)]:
            c = shape[1]
            lows, highs = rng.uniform(-2, 0, c), rng.uniform(0.5, 3, c)
            for w in (wire_grid(bits, float(lows[0]), float(highs[0])), wire_grid(bits, lows.tolist(), highs.tolist())):
                q = wire_quantize(rng.normal(0, 2, shape).astype(np.float32), w)
                body = wire.pack(q, w["scale"], w["zero_point"], sha, bits=bits)
                assert body[4] == (1 if bits == 8 and w["granularity"] == "tensor" else 2)
                cases.append(("pack_message", q.ravel(), list(shape), w, sha))
                want.append(body)
    q = np.array([[-128, 127, 0, 5]], np.int8)
    cases += [("pack_message", q.ravel(), [1, 4], {"scale": 0.02, "zero_point": -3}, sha),  # no bits: 8
              ("pack_message", q.ravel(), [1, 4], {"bits": 8, "scale": 0.02, "zero_point": -3}, sha)]
    want += [wire.pack(q, 0.02, -3, sha)] * 2
    for (_, q, dims, *_), got, w in zip(cases, js(cases), want):
        assert got["out"].dtype == np.uint8
        assert got["out"].tobytes() == w
        msg = wire.unpack(got["out"].tobytes())
        np.testing.assert_array_equal(msg.q.ravel(), q)
        assert msg.shape == dims and msg.encoder_sha256 == sha


def test_wire_errors(js):
    sha = "ab" * 32
    q = np.array([-2, 1, 0, 1], np.int8)
    pc = {"bits": 4, "scale": [0.1, 0.2], "zero_point": [0, 1]}
    g4 = {"bits": 4, "scale": 0.1, "zero_point": 0}
    got = js([("pack_message", np.array([-9, 0, 1, 2], np.int8), [2, 2], g4, sha),
              ("pack_message", q, [2, 2], g4, "AB" * 32),
              ("pack_message", q, [1, 4], pc, sha),
              ("pack_message", q, [2, 2], {"bits": 4, "scale": 0.1, "zero_point": 8}, sha),
              ("pack_message", q, [2, 2], {"bits": 9, "scale": 0.1, "zero_point": 0}, sha),
              ("wire_quantize", np.zeros(4, np.float32), [1, 4], pc),
              ("to_wire", np.zeros(4, np.float32), [2, 2], [], {**pc, "order": "sideways"}, {"seed": 0}, True),
              ("pack_message", q, [2, 2], pc, sha)])
    needles = ["4-bit codes must lie in [-8, 7], got -9", "64 lowercase hex", "per-channel grid needs lists of 4",
               "zero_point must be an integer in [-8, 7]", "bits must be an integer in 2..8",
               "per-channel wire grid needs lists of 4", "unknown wire order"]
    for r, needle in zip(got, needles):
        assert needle in r["error"], r
    assert got[-1]["out"].tobytes() == wire.pack(q.reshape(2, 2), pc["scale"], pc["zero_point"], sha, bits=4)


# ------------------------------------------------------------------------------- normalisation


def runtime_normalize(pixels, mean, std):
    """Runtime._pixels + Runtime.encoder_output's normalisation, as runtime.py computes it."""
    x = np.divide(pixels, 255, dtype=np.float32)
    m, s = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (mean, std))
    return (x - m) / s


def test_normalize_bit_identical(js):
    rng = np.random.default_rng(1)
    rgb = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    setups = [((1, 12, 9), [0.1307], [0.3081]), ((3, 8, 11), *rgb), ((3, 5, 5), [0.5], [0.25])]
    cases, want = [], []
    for shape, mean, std in setups:
        batch = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
        batch.flat[:256] = np.arange(256)  # every byte value
        cases += [("normalize", batch.ravel(), list(shape), mean, std),  # a batch: the input shape
                  ("normalize", batch[0].ravel(), shape[0], mean, std)]  # one image: C
        want += [runtime_normalize(batch, mean, std), runtime_normalize(batch[:1], mean, std)]
    floats = np.divide(rng.integers(0, 256, (2, 3, 4, 4)), 255, dtype=np.float32)  # [0, 1] pixels pass as they are
    cases.append(("normalize", floats.ravel(), [3, 4, 4], *rgb))
    m, s = (np.asarray(v, np.float32).reshape(-1, 1, 1) for v in rgb)
    want.append((floats - m) / s)
    cases.append(("normalize", np.zeros(10, np.uint8), 3, *rgb))  # 10 pixels are no 3-channel image
    results = js(cases)
    for got, w in zip(results[:-1], want):
        assert_same(got["out"], w)
    assert "3 channels" in results[-1]["error"]


# ------------------------------------------------------------------------------- deterministic steps


def test_topk_prune_exact(js):
    rng = np.random.default_rng(2)
    z = rng.integers(-3, 4, (40, 10)).astype(np.float32)  # many ties in |z|, +-equal values, zeros
    z[0] = -0.0
    z[1, 3] = np.nan  # sorts last, as numpy's argsort
    z[2] = [5, -5, 5, -5, 1, 1, -1, 2, 2, 2]
    z5 = rng.normal(size=(30, 5)).astype(np.float32)
    ratios = [0, 0.04, 0.05, 0.15, 0.25, 0.35, 0.5, 0.55, 0.95, 1]
    cases, want = [], []
    for r in ratios:
        step = [{"type": "topk_prune", "ratio": r}]
        cases += [("release", z.ravel(), 10, step, {"seed": 0}), ("release", z5.ravel(), [5], step, {"seed": 0})]
        want += [apply_release(z, step, np.random.default_rng(0)), apply_release(z5, step, np.random.default_rng(0))]
    assert {pruned_count(0.05, 10), pruned_count(0.25, 10), pruned_count(0.5, 5)} == {0, 2}  # halves to even
    for got, w in zip(js(cases), want):
        assert_same(got["out"], w)
        assert len(got["uniforms"]) == len(got["normals"]) == 0  # no draws


def test_vib_sample_masked_and_noise_free(js):
    rng = np.random.default_rng(3)
    shape = (3, 2, 4)  # C, H, W
    z = rng.normal(size=(6, *shape)).astype(np.float32)
    per_element = {"type": "vib_sample", "log_sigma": rng.uniform(-3, 1, 24).tolist(),
                   "mask": rng.integers(0, 2, 24).tolist()}
    per_channel = {"type": "vib_sample", "log_sigma": [-1.0, 0.5, 0.0], "mask": [1, 0, 1]}
    cases = [("release", z.ravel(), list(shape), [s], {"u": [0.5], "n": [0]}) for s in (per_element, per_channel)]
    cases += [("release", z.ravel(), list(shape), [s], {"seed": 5}) for s in (per_element, per_channel)]
    cases.append(("release", z.ravel(), [4, 6], [per_channel], {"seed": 5}))  # 3 values fit neither 24 nor 4
    zeros = np.zeros(z.shape, np.float32)
    results = js(cases)
    for got, step in zip(results[:2], (per_element, per_channel)):  # eps = 0: exactly mask * z
        assert_same(got["out"], apply_release(z, [step], Replay(np.zeros(0), zeros.ravel())))
    for got, step in zip(results[2:4], (per_element, per_channel)):  # masked elements exactly 0
        mask = np.broadcast_to(np.asarray(step["mask"], np.float32).reshape((-1, 1, 1) if len(step["mask"]) == 3
                                                                              else shape), z.shape).ravel()
        assert np.all(got["out"][mask == 0] == 0) and np.all(got["out"][mask == 1] != z.ravel()[mask == 1])
    assert "vib_sample log_sigma has 3 values" in results[4]["error"]


def test_pipelines_match_numpy(js):
    """A deterministic pipeline exactly; every random step, and a pipeline of all of them, through
    the numpy functions on the JS's own draws (exact, or within ulps where exp/log enter)."""
    rng = np.random.default_rng(4)
    shape = (4, 3, 3)
    z = rng.normal(size=(50, *shape)).astype(np.float32)
    bank = rng.normal(size=(3, 36)).tolist()
    vib = {"type": "vib_sample", "log_sigma": rng.uniform(-2, 0, 4).tolist(), "mask": [1, 1, 0, 1]}
    deterministic = [{"type": "topk_prune", "ratio": 0.25}, {"type": "additive_noise", "tensors": bank[:1]},
                     {"type": "gaussian_noise", "sigma": 0}, {"type": "dropout", "p": 0},
                     {"type": "laplace_noise", "scale": 0}, {"type": "topk_prune", "ratio": 0.5}]
    single = [[{"type": "gaussian_noise", "sigma": 0.3}], [{"type": "dropout", "p": 0.7}],  # f32(0.7) < 0.7
              [{"type": "dropout", "p": 1}], [{"type": "additive_noise", "tensors": bank}],
              [{"type": "laplace_noise", "scale": 0.2}], [vib]]
    everything = [{"type": "gaussian_noise", "sigma": 0.1}, {"type": "dropout", "p": 0.2},
                  {"type": "additive_noise", "tensors": bank}, {"type": "topk_prune", "ratio": 0.3},
                  {"type": "laplace_noise", "scale": 0.05}, vib]
    runs = [deterministic, *single, everything]
    results = js([("release", z.ravel(), list(shape), steps, {"seed": 10 + i}) for i, steps in enumerate(runs)]
                 # dropout keeps U >= p compared in float32 (numpy 2 casts the Python float to the array's
                 # float32), so U = float32(0.7) < 0.7 is kept: scripted draws on and next to it
                 + [("release", z.ravel(), list(shape), single[1],
                     {"u": [float(v) for v in np.nextafter(np.float32(0.7), [-1, 0.7, 2], dtype=np.float32)]})])
    runs.append(single[1])
    assert_same(results[0]["out"], apply_release(z, deterministic, np.random.default_rng(0)))
    for got, steps in zip(results[1:], runs[1:]):
        replay = Replay(got["uniforms"], got["normals"])
        want = apply_release(z, steps, replay)
        assert replay.done(), f"{steps}: the JS drew more than numpy uses"
        if any(s["type"] in ("laplace_noise", "vib_sample") for s in steps):
            assert_close(got["out"], want)
        else:
            assert_same(got["out"], want)


# ------------------------------------------------------------------------------- statistics


def test_random_steps_statistics(js):
    """release.js's own seeded draws have the distributions the steps name. Fixed seeds make the
    test deterministic; each tolerance is >= 5 standard errors of its estimate, so a correct
    implementation passes for essentially any seed and a wrong scale/probability fails."""
    rng = np.random.default_rng(5)
    n, d = 25_000, 8  # 200k elements
    z = (rng.choice([-1, 1], (n, d)) * rng.uniform(0.5, 2, (n, d))).astype(np.float32)  # no zeros
    bank = (np.arange(4)[:, None] * 3.0 + rng.uniform(0, 1, (4, d))).astype(np.float32)  # well apart
    log_sigma = np.linspace(-2, 0, d).astype(np.float32)
    mask = np.array([1, 0] * (d // 2), np.float32)
    steps = [[{"type": "gaussian_noise", "sigma": 0.5}], [{"type": "laplace_noise", "scale": 0.3}],
             [{"type": "dropout", "p": 0.3}], [{"type": "additive_noise", "tensors": bank.tolist()}],
             [{"type": "vib_sample", "log_sigma": log_sigma.tolist(), "mask": mask.tolist()}]]
    cases = [("release", z.ravel(), d, s, {"seed": 100 + i}) for i, s in enumerate(steps)]
    cases += [("rng", 7, 1000), ("rng", 7, 1000), ("rng", 8, 1000), ("rng", None, 1000), ("rng", None, 1000)]
    gauss, lap, drop, add, vib, r7, r7b, r8, ra, rb = (r.get("out", r) for r in js(cases))
    m = z.size

    r = gauss.reshape(n, d).astype(np.float64) - z  # float32 rounding of z + noise: <= 1e-7, negligible
    assert abs(r.mean()) < 5 * 0.5 / math.sqrt(m)  # SE of the mean: sigma / sqrt(m) = 0.0011
    assert abs(r.std() / 0.5 - 1) < 0.01  # relative SE of a normal std: 1 / sqrt(2m) = 0.0016
    assert abs(np.mean(np.abs(r) < 0.5) - 0.6827) < 0.005  # normal: P(|r| < sigma); SE 0.001

    r = lap.reshape(n, d).astype(np.float64) - z
    assert abs(r.mean()) < 5 * math.sqrt(2) * 0.3 / math.sqrt(m)  # SE sqrt(2) b / sqrt(m) = 0.00095
    assert abs(r.std() / (math.sqrt(2) * 0.3) - 1) < 0.015  # rel. SE with kurtosis 6: sqrt(5 / 4m) = 0.0025
    assert abs(np.abs(r).mean() / 0.3 - 1) < 0.012  # |Laplace| ~ Exp(b): rel. SE 1 / sqrt(m) = 0.0022

    out, zf = drop, z.ravel()
    assert abs(np.mean(out == 0) - 0.3) < 0.005  # SE sqrt(p (1 - p) / m) = 0.001
    kept = out != 0
    np.testing.assert_array_equal(out[kept], zf[kept])  # untouched elements exactly equal

    out = add.reshape(n, d)
    k = np.argmin(np.abs((out - z)[:, None, :] - bank[None]).sum(-1), axis=1)
    np.testing.assert_array_equal(out, z + bank[k])  # each sample is z + one tensor, in float32
    assert np.all(np.abs(np.bincount(k, minlength=4) / n - 0.25) < 0.015)  # SE sqrt(3/16 / n) = 0.0027

    out = vib.reshape(n, d)
    assert np.all(out[:, mask == 0] == 0)
    on = mask == 1
    std = (out[:, on] - z[:, on]).std(axis=0)
    assert np.all(np.abs(std / np.exp(log_sigma[on].astype(np.float64)) - 1) < 0.03)  # rel. SE 1/sqrt(2n) = 0.0045

    for draws in (r7, r8, ra):
        u = draws["uniforms"]
        assert np.all((u >= 0) & (u < 1)) and np.all(u * 2**24 == np.floor(u * 2**24))  # the float32 grid
        assert abs(u.mean() - 0.5) < 0.05 and abs(draws["normals"].std() - 1) < 0.15  # n = 1000: 5+ SE
    np.testing.assert_array_equal(r7["uniforms"], r7b["uniforms"])  # a seed reproduces
    assert not np.array_equal(r7["uniforms"], r8["uniforms"])
    assert not np.array_equal(ra["uniforms"], rb["uniforms"])  # unseeded: crypto seeds differ


# ------------------------------------------------------------------------------- errors


def test_unknown_step_and_bad_parameters(js):
    z = np.ones(8, np.float32)
    got = js([("release", z, 4, [{"type": "gaussian_noise", "sigma": 0.1}, {"type": "shuffle_bits"}], {"seed": 0}),
              ("release", z, 4, [{"type": "gaussian_noise"}], {"seed": 0}),
              ("release", z, 4, [{"type": "additive_noise", "tensors": [[1, 2, 3]]}], {"seed": 0}),
              ("release", z, 3, [], {"seed": 0})])
    msg = got[0]["error"]
    assert "shuffle_bits" in msg and "update the page" in msg
    assert "needs 'sigma'" in got[1]["error"]
    assert "additive_noise tensors" in got[2]["error"]
    assert "whole number of samples" in got[3]["error"]
