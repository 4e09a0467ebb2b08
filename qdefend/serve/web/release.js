// The browser twin of the device's release transform and int8 wire grid.
//
// A page that runs the encoder itself sends what a device sends (qdefend/edge/runtime.py
// `Runtime.encode`): normalise the pixels with manifest.input.normalization, run the encoder,
// apply manifest.release.steps in order (`applyRelease`), quantise onto manifest.features.wire
// (`quantize`). Every function mirrors the numpy one named in its comment, in float32 arithmetic
// (Math.fround after each operation), so deterministic parts are bit-identical to numpy; random
// steps draw from the same distributions but from this file's PRNG, not numpy's PCG64.
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

/** release.quantize: clip(rint(float32(z) * float32(1 / scale)) + zeroPoint, -128, 127) as int8,
 * in float32 with round half to even. */
export function quantize(z, scale, zeroPoint) {
  const inv = f32(1 / scale), out = new Int8Array(z.length);
  for (let i = 0; i < z.length; i++) {
    const q = f32(rint(f32(f32(z[i]) * inv)) + zeroPoint);
    out[i] = q < -128 ? -128 : q > 127 ? 127 : q; // NaN stores as 0
  }
  return out;
}

/** release.dequantize: (float32(q) - float32(zeroPoint)) * float32(scale). */
export function dequantize(q, scale, zeroPoint) {
  const s = f32(scale), zp = f32(zeroPoint);
  return Float32Array.from(q, (v) => f32(f32(v - zp) * s));
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
