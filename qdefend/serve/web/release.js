// The browser twin of the device's release transform, wire grid and features message.
//
// A page that runs the encoder itself sends what a device sends (qdefend/edge/runtime.py
// `Runtime.encode`): normalise the pixels with manifest.input.normalization, run the encoder,
// apply manifest.release.steps and quantise onto manifest.features.wire (any bit-width, per tensor
// or per channel) in the grid's order (`toWire`), then pack the binary message of
// qdefend/edge/wire.py (`packMessage`). Every function mirrors the numpy one named in its
// comment, in float32 arithmetic (Math.fround after each operation), so deterministic parts are
// bit-identical to numpy; random steps draw from the same distributions but from this file's
// PRNG, not numpy's PCG64.
// Dependency-free ES module: runs in browsers and in Node >= 20 (`import`).
// Parity tests: tests/test_web_release.py.

const f32 = Math.fround;

// ------------------------------------------------------------------------------- randomness

// splitmix32: spreads a seed over the generator's state words.
function splitmix32(a) {
  return () => {
    a = (a + 0x9e3779b9) | 0;
    let t = a ^ (a >>> 16);
    t = Math.imul(t, 0x21f0aaad);
    t ^= t >>> 15;
    t = Math.imul(t, 0x735a2d97);
    return (t ^ (t >>> 15)) >>> 0;
  };
}

/** A seeded PRNG (xoshiro128**): `.uniform()` in [0, 1) on the 2^-24 grid (the values numpy's
 * float32 `random` draws), `.normal()` ~ N(0, 1) by Box-Muller. `makeRng()` seeds itself from
 * crypto.getRandomValues; `makeRng(seed)` (an integer >= 0) is reproducible. */
export function makeRng(seed) {
  let s;
  if (seed === undefined || seed === null) {
    s = globalThis.crypto.getRandomValues(new Uint32Array(4));
  } else {
    if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`rng seed must be an integer >= 0, got ${seed}`);
    const next = splitmix32((seed >>> 0) ^ Math.imul(Math.floor(seed / 2 ** 32), 0x9e3779b1));
    s = Uint32Array.from([next(), next(), next(), next()]);
  }
  if (!(s[0] | s[1] | s[2] | s[3])) s[0] = 1; // the all-zero state is a fixed point
  const rotl = (x, k) => (x << k) | (x >>> (32 - k));
  const next32 = () => {
    const out = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 11);
    return out;
  };
  const uniform = () => (next32() >>> 8) / 16777216;
  let spare = null; // Box-Muller makes normals in pairs
  const normal = () => {
    if (spare !== null) { const v = spare; spare = null; return v; }
    const r = Math.sqrt(-2 * Math.log(1 - uniform())), a = 2 * Math.PI * uniform(); // 1 - u in (0, 1]
    spare = r * Math.sin(a);
    return r * Math.cos(a);
  };
  return { uniform, normal };
}

// ------------------------------------------------------------------------------- rounding

/** Round half to even (np.rint, Python's round); Math.round rounds halves up. */
function rint(v) {
  if (!Number.isFinite(v)) return v;
  const f = Math.floor(v), d = v - f; // exact in binary floating point
  return d < 0.5 ? f : d > 0.5 ? f + 1 : f % 2 === 0 ? f : f + 1;
}

/** release.pruned_count: how many elements of a sample topk_prune zeroes, Python's
 * round(ratio * D) (half to even: ratio 0.5 of D 5 prunes 2). */
export function prunedCount(ratio, perSample) {
  return rint(Number(ratio) * perSample);
}

// ------------------------------------------------------------------------------- release steps

function param(step, key) { // release._param
  if (!(key in step)) throw new Error(`release step ${JSON.stringify(step)} needs '${key}': fix release.steps in the manifest`);
  return Number(step[key]);
}

// release._gaussian_np: z + float32(sigma) * N(0, 1), all float32.
function gaussianNoise(z, shape, step, rng) {
  const sigma = f32(param(step, "sigma"));
  if (!sigma) return z;
  return z.map((v) => f32(v + f32(sigma * f32(rng.normal()))));
}

// release._laplace_np: z + Laplace(0, scale), summed in float64 then rounded to float32. Drawn as
// scale * (E1 - E2), E ~ Exp(1), as the torch twin (finite for every uniform draw).
function laplaceNoise(z, shape, step, rng) {
  const b = param(step, "scale");
  if (!b) return z;
  const exp1 = () => -Math.log(1 - rng.uniform());
  return z.map((v) => f32(v + b * (exp1() - exp1())));
}

// release._dropout_np: z * (U >= p), U float32 in [0, 1), p compared in float32, no 1/(1-p)
// rescaling; a dropped element is z * 0 (-0 for negative z, NaN for infinite z, as numpy).
function dropout(z, shape, step, rng) {
  const p = param(step, "p");
  if (!p) return z;
  const p32 = f32(p);
  return z.map((v) => v * (rng.uniform() >= p32 ? 1 : 0));
}

// release._topk_np: zero the round(ratio * D) smallest-|z| elements of each sample; ties go to
// the lower index first (numpy's stable argsort), NaN sorts last.
function topkPrune(z, shape, step) {
  const D = shape.size, k = prunedCount(param(step, "ratio"), D);
  if (k === 0 || z.length === 0) return z;
  const out = z.slice(), idx = Array.from({ length: D }, (_, i) => i);
  const key = new Float32Array(D);
  for (let n = 0; n < z.length; n += D) {
    for (let i = 0; i < D; i++) key[i] = Math.abs(z[n + i]);
    idx.sort((a, b) => {
      const x = key[a], y = key[b];
      if (x < y) return -1;
      if (x > y) return 1;
      const nx = Number.isNaN(x), ny = Number.isNaN(y);
      return nx !== ny ? (nx ? 1 : -1) : a - b; // a total order: the result needs no stable sort
    });
    for (let j = 0; j < k; j++) out[n + idx[j]] = 0;
  }
  return out;
}

// release._additive_np: z + one of the K float32 tensors per sample, drawn uniformly (no draw for
// K = 1), summed in float32.
function additiveNoise(z, shape, step, rng) {
  const bank = step.tensors.map((t) => Float32Array.from(t)), K = bank.length, D = shape.size;
  if (!K || bank.some((t) => t.length !== D)) {
    throw new Error(`additive_noise tensors (${K}, ${bank[0]?.length}) do not match features of ${D} values: re-export the run`);
  }
  const out = new Float32Array(z.length);
  for (let n = 0; n < z.length; n += D) {
    const t = bank[K > 1 ? Math.min(K - 1, Math.floor(rng.uniform() * K)) : 0];
    for (let i = 0; i < D; i++) out[n + i] = f32(z[n + i] + t[i]);
  }
  return out;
}

// release._vib_view: a vib_sample list per element (D values) or per channel (C values, each
// repeated over its H*W plane), as a per-element Float32Array of length D.
function vibView(step, key, shape) {
  const t = Float32Array.from(step[key]), D = shape.size;
  if (t.length === D) return t;
  const C = shape.dims ? shape.dims[0] : t.length; // a bare D: channels are the list's length
  if (t.length === C && C > 0 && D % C === 0) {
    const hw = D / C;
    return Float32Array.from({ length: D }, (_, i) => t[Math.floor(i / hw)]);
  }
  throw new Error(`vib_sample ${key} has ${t.length} values, features of ${D} values need ${D} (per element)` +
                  ` or ${shape.dims ? C : "a divisor of D"} (per channel): re-export the run`);
}

// release._vib_np: mask * (z + exp(log_sigma) * N(0, 1)) per element, float32.
function vibSample(z, shape, step, rng) {
  const logSigma = vibView(step, "log_sigma", shape), mask = vibView(step, "mask", shape), D = shape.size;
  const sigma = logSigma.map((v) => f32(Math.exp(v))); // numpy's float32 exp may be 1 ulp apart
  return z.map((v, i) => f32(mask[i % D] * f32(v + f32(sigma[i % D] * f32(rng.normal())))));
}

/** The step types of release.STEP_TYPES, by name. */
export const STEP_TYPES = {
  gaussian_noise: gaussianNoise,
  laplace_noise: laplaceNoise,
  dropout,
  topk_prune: topkPrune,
  additive_noise: additiveNoise,
  vib_sample: vibSample,
};

/** release.apply_release: the release steps in order on float features.
 * z: N * perSample float32 values, one sample after another (row-major); perSample: D, or the
 * feature shape [C, H, W] (manifest.features.shape, needed to check per-channel vib_sample lists);
 * steps: manifest.release.steps; rng: an object with .uniform() and .normal() (makeRng()).
 * Returns a new Float32Array. */
export function applyRelease(z, perSample, steps, rng = makeRng()) {
  const dims = Array.isArray(perSample) ? perSample.map(Number) : null;
  const shape = { size: dims ? dims.reduce((a, b) => a * b, 1) : Number(perSample), dims };
  let out = Float32Array.from(z);
  if (!Number.isInteger(shape.size) || shape.size < 0 || (shape.size ? out.length % shape.size : out.length)) {
    throw new Error(`release input has ${out.length} values, not a whole number of samples of ${shape.size}`);
  }
  for (const step of steps) {
    const type = step && typeof step === "object" ? step.type : step;
    const fn = Object.hasOwn(STEP_TYPES, type) ? STEP_TYPES[type] : null;
    if (!fn) {
      throw new Error(`unknown release step type ${JSON.stringify(type)}; this page knows ` +
                      `${Object.keys(STEP_TYPES).join(", ")}: update the page (serve it from the current qdefend)`);
    }
    out = fn(out, shape, step, rng);
  }
  return out;
}

// ------------------------------------------------------------------------------- wire grid
// A wire grid is manifest.features.wire: {"dtype": "int8", "bits": B (2..8, default 8),
// "granularity": "tensor" | "channel", "order": "release_then_wire" | "wire_then_release",
// "scale": s, "zero_point": zp}, with lists of one scale and zero point per channel (axis 1 of the
// features, dims [N, C, ...]) for a per-channel grid. Codes are signed B-bit integers in
// [-2^(B-1), 2^(B-1) - 1], held in an Int8Array; the wire message bit-packs them (`packMessage`).

export const WIRE_ORDERS = ["release_then_wire", "wire_then_release"];
const DEFAULT_ORDER = "release_then_wire";

function checkBits(bits) { // wire._check_bits
  if (!Number.isInteger(bits) || bits < 2 || bits > 8) throw new Error(`bits must be an integer in 2..8, got ${bits}`);
  return bits;
}

/** release.code_range: the signed codes of a `bits`-bit wire, [-2^(bits-1), 2^(bits-1) - 1]. */
export function codeRange(bits = 8) {
  checkBits(bits);
  return [-(1 << (bits - 1)), (1 << (bits - 1)) - 1];
}

/** release.wire_bits: the grid's bits per code (8 when absent). */
export function wireBits(wire) {
  return checkBits(wire.bits === undefined ? 8 : wire.bits);
}

/** release.wire_order: where the quantiser sits relative to the release steps. */
export function wireOrder(wire) {
  const order = wire?.order ?? DEFAULT_ORDER;
  if (!WIRE_ORDERS.includes(order)) {
    throw new Error(`unknown wire order ${JSON.stringify(order)}; this page knows ${WIRE_ORDERS.join(", ")}: ` +
                    "update the page (serve it from the current qdefend)");
  }
  return order;
}

// float32 quantisation of z[from..to) onto one grid, into out (see quantize).
function quantizeRange(z, out, from, to, scale, zeroPoint, lo, hi) {
  const inv = f32(1 / Number(scale)), zp = f32(Number(zeroPoint));
  for (let i = from; i < to; i++) {
    const q = f32(rint(f32(f32(z[i]) * inv)) + zp);
    out[i] = q < lo ? lo : q > hi ? hi : q; // NaN stores as 0
  }
}

// float32 dequantisation of q[from..to) on one grid, into out (see dequantize).
function dequantizeRange(q, out, from, to, scale, zeroPoint) {
  const s = f32(Number(scale)), zp = f32(Number(zeroPoint));
  for (let i = from; i < to; i++) out[i] = f32(f32(q[i] - zp) * s);
}

/** release.quantize: clip(rint(float32(z) * float32(1 / scale)) + zeroPoint) as int8, clipped to
 * the `bits`-bit codes (codeRange; [-128, 127] at 8 bits), in float32 with round half to even. */
export function quantize(z, scale, zeroPoint, bits = 8) {
  const [lo, hi] = codeRange(bits), out = new Int8Array(z.length);
  quantizeRange(z, out, 0, z.length, scale, zeroPoint, lo, hi);
  return out;
}

/** release.dequantize: (float32(q) - float32(zeroPoint)) * float32(scale). */
export function dequantize(q, scale, zeroPoint) {
  const out = new Float32Array(q.length);
  dequantizeRange(q, out, 0, q.length, scale, zeroPoint);
  return out;
}

const isList = (v) => Array.isArray(v) || ArrayBuffer.isView(v);

// release._channel_view: the grid as [scales, zeroPoints, plane] over features of dims [N, C, ...]:
// one scale (per tensor: plane 0) or one per channel of axis 1 (plane: the values of one channel
// of one sample, prod(dims[2:])).
function gridView(wire, dims, n) {
  const d = Array.from(dims, Number), size = d.reduce((a, b) => a * b, 1);
  if (d.length < 2 || !d.every((v) => Number.isInteger(v) && v >= 0)) {
    throw new Error(`features dims must be [N, C, ...] (batch first), got ${JSON.stringify(d)}`);
  }
  if (size !== n) throw new Error(`features dims [${d}] hold ${size} values, got ${n}`);
  const { scale, zero_point: zp } = wire;
  if (!isList(scale) && !isList(zp)) return { scales: [scale], zps: [zp], C: 1, plane: 0 };
  const C = d[1];
  if (!isList(scale) || !isList(zp) || scale.length !== zp.length || scale.length !== C) {
    throw new Error(`a per-channel wire grid needs lists of ${C} scales and ${C} zero points (one per ` +
                    `channel of features [${d}]), got ${isList(scale) ? scale.length : "one"} and ` +
                    `${isList(zp) ? zp.length : "one"}: re-export the run`);
  }
  return { scales: Array.from(scale), zps: Array.from(zp), C, plane: d.slice(2).reduce((a, b) => a * b, 1) };
}

// Each [from, to, channel] run of one grid in row-major features.
function* gridRuns(g, n) {
  if (!g.plane) { yield [0, n, 0]; return; }
  for (let i = 0, c = 0; i < n; i += g.plane, c = (c + 1) % g.C) yield [i, i + g.plane, c];
}

/** release.wire_quantize: float features (dims [N, C, ...], row-major) -> int8 codes on the wire
 * grid (any bit-width, per tensor or per channel). */
export function wireQuantize(z, dims, wire) {
  const [lo, hi] = codeRange(wireBits(wire)), g = gridView(wire, dims, z.length), out = new Int8Array(z.length);
  for (const [from, to, c] of gridRuns(g, z.length)) quantizeRange(z, out, from, to, g.scales[c], g.zps[c], lo, hi);
  return out;
}

/** release.wire_dequantize: int8 codes on the wire grid -> the float32 features the cloud side sees. */
export function wireDequantize(q, dims, wire) {
  const g = gridView(wire, dims, q.length), out = new Float32Array(q.length);
  for (const [from, to, c] of gridRuns(g, q.length)) dequantizeRange(q, out, from, to, g.scales[c], g.zps[c]);
  return out;
}

/** release.to_wire: what a device sends for encoder outputs z (dims [N, C, ...], row-major): the
 * release steps (applyRelease, on the feature shape dims[1:]) and the wire quantiser in the
 * grid's order: release_then_wire Q(release(z)), wire_then_release Q(release(deQ(Q(z)))).
 * release = false puts the bare output on the grid. Returns an Int8Array of codes. */
export function toWire(z, dims, steps, wire, rng = makeRng(), release = true) {
  let x = Float32Array.from(z);
  if (release) {
    if (wireOrder(wire) === "wire_then_release") x = wireDequantize(wireQuantize(x, dims, wire), dims, wire);
    x = applyRelease(x, Array.from(dims).slice(1), steps, rng);
  }
  return wireQuantize(x, dims, wire);
}

// ------------------------------------------------------------------------------- wire message

/** wire.pack_bits: int8 codes in [-2^(bits-1), 2^(bits-1) - 1] -> ceil(n * bits / 8) bytes, each
 * code stored as code + 2^(bits-1) in `bits` bits, least significant bit first, packed into bytes
 * from bit 0 (numpy's packbits(bitorder="little")); the last byte's unused bits are zero. */
export function packBits(q, bits) {
  checkBits(bits);
  const off = 1 << (bits - 1), mask = (1 << bits) - 1, out = new Uint8Array(Math.ceil((q.length * bits) / 8));
  let acc = 0, held = 0, o = 0;
  for (let i = 0; i < q.length; i++) {
    acc |= ((q[i] + off) & mask) << held; // held < 8: acc stays below 2^16
    held += bits;
    while (held >= 8) { out[o++] = acc & 0xff; acc >>>= 8; held -= 8; }
  }
  if (held) out[o] = acc & 0xff;
  return out;
}

/** wire.unpack_bits: the inverse of packBits, n int8 codes from the packed bytes. */
export function unpackBits(buf, n, bits) {
  checkBits(bits);
  const off = 1 << (bits - 1), mask = (1 << bits) - 1, out = new Int8Array(n);
  let acc = 0, held = 0, j = 0;
  for (let i = 0; i < n; i++) {
    while (held < bits) { acc |= buf[j++] << held; held += 8; }
    out[i] = (acc & mask) - off;
    acc >>>= bits;
    held -= bits;
  }
  return out;
}

function checkGrid(scale, zeroPoint, bits) { // wire._check_grid
  const [lo, hi] = codeRange(bits);
  if (typeof scale !== "number" || !Number.isFinite(scale) || !(scale > 0)) {
    throw new Error(`scale must be a finite number > 0, got ${scale}`);
  }
  if (!Number.isInteger(zeroPoint) || zeroPoint < lo || zeroPoint > hi) {
    throw new Error(`zero_point must be an integer in [${lo}, ${hi}] for ${bits}-bit codes, got ${zeroPoint}`);
  }
}

const MAGIC = [0x51, 0x44, 0x46, 0x31]; // "QDF1"
const MAX_NDIM = 8;

/** wire.pack: the binary features message (Content-Type application/x-qdefend-features) for int8
 * codes q of dims [N, C, ...] on the grid wire ({bits, scale, zero_point}: numbers, or lists of
 * one per channel) from the encoder of sha256 encoderSha256 (64 lowercase hex digits). A per-tensor
 * 8-bit grid travels as version 1, anything else as version 2 (bit-packed codes, the layout in
 * qdefend/edge/wire.py). Returns a Uint8Array (its .buffer is exactly the body). */
export function packMessage(q, dims, wire, encoderSha256) {
  if (!(q instanceof Int8Array)) {
    throw new Error("features must be int8 codes (an Int8Array): quantise them with the manifest's wire grid");
  }
  const d = Array.from(dims, Number), ndim = d.length;
  if (ndim < 2 || ndim > MAX_NDIM) {
    throw new Error(`features must have 2..${MAX_NDIM} dimensions (batch first), got shape ${JSON.stringify(d)}`);
  }
  if (!d.every((v) => Number.isInteger(v) && v >= 0 && v < 2 ** 32) || d.reduce((a, b) => a * b, 1) !== q.length) {
    throw new Error(`features dims [${d}] do not hold the ${q.length} codes`);
  }
  const bits = wireBits(wire), perChannel = isList(wire.scale) || isList(wire.zero_point);
  const scales = perChannel ? Array.from(wire.scale ?? [], Number) : [wire.scale];
  const zps = perChannel ? Array.from(wire.zero_point ?? [], Number) : [wire.zero_point];
  if (perChannel && !(isList(wire.scale) && isList(wire.zero_point) && scales.length === d[1] && zps.length === d[1])) {
    throw new Error(`a per-channel grid needs lists of ${d[1]} scales and ${d[1]} zero points ` +
                    `(one per channel of shape [${d}])`);
  }
  scales.forEach((s, i) => checkGrid(s, zps[i], bits));
  if (typeof encoderSha256 !== "string" || !/^[0-9a-f]{64}$/.test(encoderSha256)) {
    throw new Error("encoder_sha256 must be 64 lowercase hex digits: the sha256 of the encoder artifact " +
                    "(see GET /v1/manifest)");
  }
  const sha = Uint8Array.from({ length: 32 }, (_, i) => parseInt(encoderSha256.slice(2 * i, 2 * i + 2), 16));
  if (bits === 8 && !perChannel) {
    // version 1: magic, version, dtype, ndim, reserved, scale, zero_point, sha256, dims, the int8 codes
    const head = 52 + 4 * ndim, out = new Uint8Array(head + q.length), v = new DataView(out.buffer);
    out.set(MAGIC);
    v.setUint8(4, 1); v.setUint8(5, 1); v.setUint8(6, ndim); v.setUint8(7, 0);
    v.setFloat64(8, scales[0], true); v.setInt32(16, zps[0], true);
    out.set(sha, 20);
    d.forEach((n, i) => v.setUint32(52 + 4 * i, n, true));
    out.set(new Uint8Array(q.buffer, q.byteOffset, q.length), head);
    return out;
  }
  const [lo, hi] = codeRange(bits);
  for (let i = 0; i < q.length; i++) {
    if (q[i] < lo || q[i] > hi) {
      throw new Error(`${bits}-bit codes must lie in [${lo}, ${hi}], got ${q[i]}: ` +
                      "quantise with the manifest's wire grid");
    }
  }
  // version 2: magic, version, bits, ndim, axis, sha256, dims, the grid (scales then zero points), packed codes
  const codes = packBits(q, bits), C = scales.length, head = 40 + 4 * ndim + 12 * C;
  const out = new Uint8Array(head + codes.length), v = new DataView(out.buffer);
  out.set(MAGIC);
  v.setUint8(4, 2); v.setUint8(5, bits); v.setUint8(6, ndim); v.setUint8(7, perChannel ? 1 : 0);
  out.set(sha, 8);
  d.forEach((n, i) => v.setUint32(40 + 4 * i, n, true));
  const grid = 40 + 4 * ndim;
  scales.forEach((s, i) => v.setFloat64(grid + 8 * i, s, true));
  zps.forEach((z, i) => v.setInt32(grid + 8 * C + 4 * i, z, true));
  out.set(codes, head);
  return out;
}

// ------------------------------------------------------------------------------- input

/** Runtime.encoder_output's normalisation: (x / 255 - mean) / std per channel, float32, NCHW.
 * pixels: uint8 [0, 255] values (float [0, 1] pixels are taken as they are, as Runtime._pixels);
 * channels: C for one C x H x W image, or the input shape [C, H, W] (manifest.input.shape) for a
 * batch; mean, std: manifest.input.normalization's, one value per channel (or one for all). */
export function normalize(pixels, channels, mean, std) {
  const dims = Array.isArray(channels) ? channels.map(Number) : null;
  const C = dims ? dims[0] : Number(channels);
  const plane = dims ? dims.slice(1).reduce((a, b) => a * b, 1) : pixels.length / C;
  if (!(C > 0) || !Number.isInteger(plane) || pixels.length % (C * plane)) {
    throw new Error(`${pixels.length} pixels are not whole images of ${dims ? `[${dims}]` : `${C} channels`}`);
  }
  const m = Float32Array.from(mean), s = Float32Array.from(std);
  if (![1, C].includes(m.length) || ![1, C].includes(s.length)) {
    throw new Error(`normalization needs ${C} mean and std values, got ${m.length} and ${s.length}`);
  }
  const bytes = pixels instanceof Uint8Array || pixels instanceof Uint8ClampedArray;
  const out = new Float32Array(pixels.length);
  for (let i = 0; i < pixels.length; i++) {
    const c = Math.floor(i / plane) % C, x = bytes ? f32(pixels[i] / 255) : f32(pixels[i]);
    out[i] = f32(f32(x - m[m.length > 1 ? c : 0]) / s[s.length > 1 ? c : 0]);
  }
  return out;
}
