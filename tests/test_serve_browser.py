"""The phone-browser page in a real headless Chromium, against a real `qdefend serve` on loopback.

A tiny real QAT run (quarter-width encoder, 256 images, 1 epoch, Gaussian release noise sigma
0.1) is trained and exported once (about a minute on 2 cores). Chromium (Debian's, driven over
the DevTools protocol by qdefend.serve.browser) opens the served page, which loads the int8
encoder and onnxruntime-web's wasm build from the server, never from a CDN. Checked:

* the browser's int8 features of real test images (release off) against the Python runtime:
  onnxruntime (expected bit-identical, the same kernels' arithmetic) and LiteRT (within 1 LSB);
* released features from the page: the server's labels equal the local head's on the same bytes,
  and the release noise has the run's sigma;
* the page's image path (PNG -> canvas -> grey) against Pillow's conversion of the same file;
* the phone-web bundle: the static folder served by a plain HTTP server on another port, the page
  calling `qdefend serve` across origins (CORS), parity and answers as above.
"""

import base64
import functools
import http.server
import io
import json
import shutil
import threading

import numpy as np
import pytest

from qdefend.data import reference_images
from qdefend.devices.bundle import extract_bundle, make_bundle
from qdefend.edge.runtime import Runtime
from qdefend.serve.service import ServeConfig
from conftest import tiny_exported_run
from test_serve import TOKEN, LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SIGMA = 0.1
READY = "!!(window.qdefend && document.readyState === 'complete')"
CONNECTED = "!!(window.qdefend && window.qdefend.state.session)"


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


# JS helpers evaluated in the page: base64 uint8 pixels in, base64 int8 codes out.
JS_ENCODE = """(async () => {
  const px = Uint8Array.from(atob("%s"), c => c.charCodeAt(0));
  const f = await qdefend.encodePixels(px, %d, {release: %s, seed: %s});
  const bytes = new Uint8Array(f.q.buffer, f.q.byteOffset, f.q.length);
  let s = ""; for (const b of bytes) s += String.fromCharCode(b);
  const out = {q: btoa(s), shape: f.shape, scale: f.scale, zeroPoint: f.zeroPoint, encodeMs: f.encodeMs};
  if (%s) out.answer = await qdefend.infer(f);
  return out;
})()"""


def browser_encode(b, images, release=False, seed="null", send=False):
    res = b.evaluate(JS_ENCODE % (_b64(images), len(images), str(release).lower(), seed, str(send).lower()),
                     timeout=120)
    q = np.frombuffer(base64.b64decode(res["q"]), np.int8).reshape(res["shape"])
    return q, res


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_exported_run(tmp_path_factory.mktemp("web") / "tiny", sigma=SIGMA)


@pytest.fixture(scope="module")
def images(run_dir):
    """64 real test images + all-0 + all-255 (uint8 N x 1 x 28 x 28)."""
    return reference_images(run_dir, [1, 28, 28], n=66)[0]


@pytest.fixture(scope="module")
def static_site(run_dir, tmp_path_factory):
    """The phone-web bundle extracted and served by a plain stdlib HTTP server on 127.0.0.1."""
    archive = make_bundle(run_dir, "phone-web", out=tmp_path_factory.mktemp("pw"))
    root = extract_bundle(archive, tmp_path_factory.mktemp("site"))

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                          ".json": "application/json", ".html": "text/html", ".css": "text/css", "": "application/octet-stream"}

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(run_dir, static_site, tmp_path_factory):
    from qdefend.serve.app import create_app

    tok = tmp_path_factory.mktemp("tok") / "token.txt"
    tok.write_text(TOKEN)
    cfg = ServeConfig(run=str(run_dir), token_file=str(tok), allow_origins=[static_site[0]])
    s = LiveServer(create_app(cfg))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    if shutil.which("chromium") is None and not __import__("os").path.exists("/usr/lib/chromium/chromium"):
        pytest.fail("headless Chromium is needed: apt-get install chromium (.ci/run installs it)")
    from qdefend.serve.browser import Chromium

    with Chromium(timeout=120) as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, server):
    browser.goto(f"{server.url}/#token={TOKEN}", ready=CONNECTED)
    return browser


def test_browser_int8_features_match_the_python_runtimes(page, run_dir, images):
    q, res = browser_encode(page, images)
    ort = Runtime.open(run_dir, "encoder.int8.onnx").encode(images, release=False)
    lite = Runtime.open(run_dir, "encoder.int8.tflite").encode(images, release=False)
    d_ort = np.abs(q.astype(int) - ort.q)
    d_lite = np.abs(q.astype(int) - lite.q)
    print(f"browser vs onnxruntime: {int((d_ort > 0).sum())} of {q.size} differ, max {d_ort.max()} LSB; "
          f"vs LiteRT: {int((d_lite > 0).sum())} differ, max {d_lite.max()} LSB; "
          f"{res['encodeMs'] / len(images):.2f} ms/image in the page")
    assert (res["scale"], res["zeroPoint"]) == (ort.scale, ort.zero_point)
    assert d_ort.max() <= 1 and d_lite.max() <= 1
    assert (d_ort > 0).mean() < 0.001  # same integer arithmetic as onnxruntime: (near) bit-identical
    assert page.evaluate("qdefend.selfCheck()")["max_abs_lsb"] <= 1


def test_released_features_from_the_page_get_the_local_heads_answer(page, run_dir, images):
    q, res = browser_encode(page, images, release=True, seed=7, send=True)
    plain = Runtime.open(run_dir, "encoder.int8.onnx").encode(images, release=False)
    wire = Runtime.open(run_dir, "encoder.int8.onnx").manifest["features"]["wire"]
    head = Runtime.open(run_dir, "head.int8.onnx")
    local = head.run((q.astype(np.float32) - wire["zero_point"]) * wire["scale"]).argmax(1)
    assert res["answer"]["labels"] == local.tolist()
    # the page's noise has the run's sigma (codes off the wire's clip range only)
    inside = (q > -128) & (q < 127) & (plain.q > -128) & (plain.q < 127)
    noise = (q.astype(np.float64) - plain.q)[inside] * wire["scale"]
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - SIGMA) < 0.01, (noise.mean(), noise.std())
    again, _ = browser_encode(page, images, release=True, seed=7)
    other, _ = browser_encode(page, images, release=True, seed=8)
    assert np.array_equal(again, q) and not np.array_equal(other, q)  # seeded, and really random


def test_the_pages_image_path_matches_pillow(page, images):
    from PIL import Image

    rgb = np.repeat(images[0, 0][..., None], 3, axis=2)
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 40, 0, 255)  # a colour image: the grey conversion matters
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(buf, format="PNG")
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    got = page.evaluate("""(async () => {
      const bytes = Uint8Array.from(atob("%s"), c => c.charCodeAt(0));
      const {px} = await qdefend.filePixels(new Blob([bytes], {type: "image/png"}), false);
      return Array.from(px);
    })()""" % base64.b64encode(buf.getvalue()).decode())
    assert np.array_equal(np.asarray(got, np.uint8).reshape(28, 28), want)


def test_phone_web_bundle_served_elsewhere_talks_to_the_server_across_origins(browser, server, static_site,
                                                                              run_dir, images):
    site, root = static_site
    listed = json.loads((root / "bundle.json").read_text())["files"]
    assert {"index.html", "encoder.int8.onnx", "client-manifest.json", "static/qdefend.js",
            "static/ort/ort-wasm-simd-threaded.wasm"} <= set(listed)
    browser.goto(f"{site}/?server={server.url}#token={TOKEN}", ready=CONNECTED)
    assert browser.evaluate("qdefend.state.api") == server.url
    q, res = browser_encode(browser, images[:8], release=False, send=True)
    ort = Runtime.open(run_dir, "encoder.int8.onnx").encode(images[:8], release=False)
    assert np.abs(q.astype(int) - ort.q).max() <= 1
    assert len(res["answer"]["labels"]) == 8
