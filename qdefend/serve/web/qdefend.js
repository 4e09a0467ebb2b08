// The phone-browser client of `qdefend serve`: runs the run's int8 encoder in the page with
// onnxruntime-web (wasm, loaded from this server's own copy of the npm package, never a CDN),
// applies the release transform and quantises onto the wire grid in the grid's order (release.js,
// the twin of qdefend/edge/release.py) and POSTs only the wire codes to /v1/infer (the binary
// layout of qdefend/edge/wire.py: version 1 for an 8-bit per-tensor grid, else bit-packed version 2).
// window.qdefend exposes the same steps to scripts and tests.
import * as ort from "./ort/ort.wasm.min.mjs";
import { dequantize, makeRng, normalize, packMessage, quantize, toWire, wireBits } from "./release.js";

const BINARY_TYPE = "application/x-qdefend-features";
const ENCODER = "encoder.int8.onnx";
const $ = (id) => document.getElementById(id);
const bundled = document.querySelector('meta[name="qdefend-bundle"]')?.content === "1";
const bundledServer = document.querySelector('meta[name="qdefend-server"]')?.content || "";

ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
ort.env.wasm.numThreads = 1; // threads need cross-origin isolation and did not help this small model

const state = { api: "", token: "", manifest: null, encoder: null, session: null, verified: null };

function apiBase() {
  const q = new URLSearchParams(location.search).get("server");
  return ($("server").value || q || (bundled ? bundledServer : location.origin)).replace(/\/+$/, "");
}

async function call(path, init = {}) {
  const headers = Object.assign({}, init.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const resp = await fetch(state.api + path, Object.assign({}, init, { headers }));
  if (!resp.ok) {
    let reason = resp.statusText;
    try { reason = (await resp.json()).error || reason; } catch (e) { /* not JSON */ }
    throw new Error(`${path}: HTTP ${resp.status}: ${reason}`);
  }
  return resp;
}

async function sha256Hex(buf) {
  if (!globalThis.crypto?.subtle) return null; // only in secure contexts (https or localhost)
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Load the manifest and the encoder (from the bundle's files, or the server), check its sha256.
async function connect() {
  state.api = apiBase();
  state.token = $("token").value || new URLSearchParams(location.hash.slice(1)).get("token") || "";
  if (state.token) localStorage.setItem("qdefend-token", state.token);
  const local = (p) => fetch(p).then((r) => { if (!r.ok) throw new Error(`${p}: HTTP ${r.status}`); return r; });
  state.manifest = await (bundled ? local("client-manifest.json") : call("/v1/manifest")).then((r) => r.json());
  state.encoder = state.manifest.encoders[ENCODER];
  if (!state.encoder) throw new Error(`the run has no ${ENCODER}: re-export it with \`qdefend export RUN\``);
  const bytes = await (bundled ? local(ENCODER) : call(`/v1/encoder/${ENCODER}`)).then((r) => r.arrayBuffer());
  const sha = await sha256Hex(bytes);
  if (sha !== null && sha !== state.encoder.sha256) {
    throw new Error(`${ENCODER} sha256 ${sha.slice(0, 12)} differs from the manifest's: reload the page`);
  }
  state.verified = sha !== null;
  state.session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  return { run: state.manifest.run, sha256_checked: state.verified, ort: ort.env.versions?.web ?? null };
}

// uint8 pixels (N x C x H x W) -> the wire codes a device sends (release on or off; Runtime.encode):
// q (Int8Array of bits-bit codes), shape, bits, the grid (scale, zeroPoint: numbers, or lists of
// one per channel) and wire (manifest.features.wire).
async function encodePixels(pixels, n, { release = true, seed = null } = {}) {
  const m = state.manifest, e = state.encoder;
  const [c, h, w] = m.input.shape;
  const t0 = performance.now();
  let x = normalize(pixels, c, m.input.normalization.mean, m.input.normalization.std);
  let feed;
  if (e.input.dtype === "int8") {
    feed = new ort.Tensor("int8", quantize(x, e.input.quant.scale, e.input.quant.zero_point), [n, c, h, w]);
  } else {
    feed = new ort.Tensor("float32", x, [n, c, h, w]);
  }
  const out = (await state.session.run({ [e.input.name]: feed }))[e.output.name];
  let z = e.output.dtype === "int8" ? dequantize(out.data, e.output.quant.scale, e.output.quant.zero_point)
    : Float32Array.from(out.data);
  const wire = m.features.wire, shape = [n, ...m.features.shape];
  const q = toWire(z, shape, m.release.steps, wire, makeRng(seed ?? undefined), release);
  return { q, shape, bits: wireBits(wire), scale: wire.scale, zeroPoint: wire.zero_point, wire,
    encodeMs: performance.now() - t0 };
}

// The binary features message of qdefend/edge/wire.py (release.js packMessage, the twin of wire.pack).
function pack(f) {
  const grid = { bits: f.bits ?? 8, scale: f.scale, zero_point: f.zeroPoint };
  return packMessage(f.q, f.shape, grid, state.encoder.sha256).buffer;
}

async function infer(f) {
  const t0 = performance.now();
  const resp = await call("/v1/infer", { method: "POST", headers: { "Content-Type": BINARY_TYPE }, body: pack(f) });
  const res = await resp.json();
  res.round_trip_ms = performance.now() - t0;
  return res;
}

// An image file -> uint8 C x H x W at the encoder's size (grey as PIL's "L": ITU-R 601-2 luma).
async function filePixels(file, invert) {
  const [c, h, w] = state.manifest.input.shape;
  const bmp = await createImageBitmap(file);
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0, w, h);
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const px = new Uint8Array(c * h * w);
  for (let i = 0; i < h * w; i++) {
    const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
    if (c === 1) px[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
    else { px[i] = r; px[h * w + i] = g; px[2 * h * w + i] = b; }
  }
  if (invert) for (let i = 0; i < px.length; i++) px[i] = 255 - px[i];
  return { px, canvas };
}

// The server's reference images through this browser's encoder, release off: int8 parity.
async function selfCheck() {
  const ref = await (await call("/v1/reference")).json();
  const n = ref.shape[0];
  const f = await encodePixels(Uint8Array.from(ref.images), n, { release: false });
  let mismatches = 0, maxLsb = 0;
  f.q.forEach((v, i) => { const d = Math.abs(v - ref.features[i]); if (d) mismatches++; maxLsb = Math.max(maxLsb, d); });
  return { images: n, values: f.q.length, mismatches, max_abs_lsb: maxLsb, reference: ref.artifact };
}

function show(msg, error = false) {
  $("status").textContent = msg;
  $("status").className = error ? "error" : "";
}

async function onSend() {
  const files = Array.from($("images").files || []);
  if (!files.length) return show("choose one or more images first", true);
  $("results").textContent = "";
  for (const file of files) {
    try {
      const { px, canvas } = await filePixels(file, $("invert").checked);
      const f = await encodePixels(px, 1);
      const res = await infer(f);
      const row = document.createElement("div");
      row.className = "result";
      row.append(canvas);
      const p = Math.max(...res.probabilities[0]);
      row.append(`${file.name}: ${res.classes[0]} (${(100 * p).toFixed(1)}%) - encode ${f.encodeMs.toFixed(1)} ms, ` +
        `round trip ${res.round_trip_ms.toFixed(1)} ms, ${f.q.length} ${f.bits}-bit features sent`);
      $("results").append(row);
    } catch (e) { show(`${file.name}: ${e.message}`, true); }
  }
}

async function onConnect() {
  try {
    show("connecting...");
    const info = await connect();
    $("send").disabled = $("check").disabled = false;
    show(`run ${info.run}: encoder loaded (sha256 ${info.sha256_checked ? "checked" : "NOT checked: use https"}), ` +
      `release ${JSON.stringify(state.manifest.release.steps.map((s) => s.type))}`);
  } catch (e) { show(e.message, true); }
}

async function onCheck() {
  try {
    const r = await selfCheck();
    show(`${r.images} reference images: ${r.mismatches} of ${r.values} int8 features differ (max ${r.max_abs_lsb} LSB)`,
      r.mismatches > 0);
  } catch (e) { show(e.message, true); }
}

window.qdefend = { connect, encodePixels, filePixels, infer, pack, selfCheck, state };
window.addEventListener("DOMContentLoaded", () => {
  $("token").value = localStorage.getItem("qdefend-token") || "";
  $("connect").onclick = onConnect;
  $("send").onclick = onSend;
  $("check").onclick = onCheck;
  $("about").textContent = `onnxruntime-web ${ort.env.versions?.web ?? ""}, served by qdefend`;
  show(bundled ? "enter the server and token, then Connect" : "enter the token, then Connect");
  if (new URLSearchParams(location.hash.slice(1)).get("token")) onConnect();
});
