"""``qdefend bundle RUN --device phone-web``: the phone-browser client as static files.

Layout (``qdefend-bundle-<run>-phone-web.tar.gz``)::

    qdefend-bundle-<run>-phone-web/
        index.html              the page (marked as a bundle: manifest and encoder come from here)
        static/qdefend.js       encode in the browser, release, quantise, POST int8 features
        static/release.js       the release transform (twin of qdefend/edge/release.py)
        static/style.css
        static/ort/             onnxruntime-web's wasm build (from the pinned npm install)
        encoder.int8.onnx       the run's int8 encoder, as exported
        client-manifest.json    what GET /v1/manifest of the run's server says about its encoders
        bundle.json             sha256 + size of every other file, the server URL if given
        README.md               how to host it and point it at `qdefend serve`

Host the folder on any static web server over https (phones allow crypto.subtle, hence the
encoder's sha256 check, only on https or localhost) and start the server with ``--allow-origin
https://THAT-HOST`` so the page may call it across origins.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path

from qdefend import __version__
from qdefend.edge.manifest import load_manifest, verify_artifact
from qdefend.errors import QdefendError
from qdefend.serve.page import ORT_FILES, ORT_VERSION, PAGE_FILES, WEB_DIR, ort_file
from qdefend.serve.service import client_manifest

__all__ = ["make_web_bundle", "ARTIFACT"]

ARTIFACT = "encoder.int8.onnx"


def _page(server: str | None) -> str:
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    marker = '<meta name="qdefend-bundle" content="">'
    if marker not in html:
        raise QdefendError(f"{WEB_DIR / 'index.html'} lacks {marker}: reinstall qdefend")
    meta = '<meta name="qdefend-bundle" content="1">'
    if server:
        meta += f'\n<meta name="qdefend-server" content="{server}">'
    return html.replace(marker, meta)


def _readme(top: str, run: str, server: str | None) -> str:
    where = server or "https://YOUR-CLOUD:8000"
    return f"""# {top}

The phone-browser client of run `{run}`: the int8 encoder runs in the phone's browser
(onnxruntime-web {ORT_VERSION}, wasm SIMD), the release transform
is applied in the page, and only int8 features go to the cloud head (`qdefend serve`).
Made by qdefend {__version__}.

## Host it

Any static web server works if it serves `.mjs` as `text/javascript` and `.wasm` as
`application/wasm`. Use https: phones run `crypto.subtle` (the encoder's sha256 check) only on
https or localhost. For a quick try on the machine itself: `python3 -m http.server 8080` here, then
open http://localhost:8080/.

## Point it at the server

    qdefend serve runs/{run} --host 0.0.0.0 --token-file token.txt --allow-origin https://THIS-PAGE-HOST \\
        --ssl-certfile cert.pem --ssl-keyfile key.pem

Open the page, enter the server ({where}) and the token, press Connect, then pick or take a
photo. "Check this browser" runs the server's reference images through this browser's encoder
and counts the int8 features that differ (0 expected).

## A native Android app instead

Ship `runs/{run}/artifacts/encoder.int8.tflite` and `manifest.json` with LiteRT's Android runtime
(com.google.ai.edge.litert): normalise as `manifest.json` "input" says, run the encoder, apply
"release", quantise onto "features.wire", and POST the binary message of qdefend.edge.wire.
"""


def make_web_bundle(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                    server: str | None = None, web_runtime: str | None = None) -> Path:
    """Write the phone-web bundle of an exported run; returns the .tar.gz path."""
    from .bundle import _write_tar, archive_path, file_table

    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    if ARTIFACT not in manifest["artifacts"]:
        raise QdefendError(f"{run_dir} has no {ARTIFACT}: run `qdefend export {run_dir} --format onnx,tflite`")
    src = verify_artifact(run_dir, manifest, ARTIFACT)
    ort = {name: ort_file(name, web_runtime) for name in ORT_FILES}  # fails early if npm ci was not run
    run, top, out = archive_path(run_dir, manifest, "phone-web", out)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="qdefend-web-") as tmp:
        stage = Path(tmp) / top
        (stage / "static" / "ort").mkdir(parents=True)
        (stage / "index.html").write_text(_page(server), encoding="utf-8")
        for name in PAGE_FILES:
            shutil.copyfile(WEB_DIR / name, stage / "static" / name)
        for name, path in ort.items():
            shutil.copyfile(path, stage / "static" / "ort" / name)
        shutil.copyfile(src, stage / ARTIFACT)
        m = copy.deepcopy(manifest)
        m["artifacts"] = {ARTIFACT: dict(m["artifacts"][ARTIFACT], path=ARTIFACT)}
        (stage / "client-manifest.json").write_text(json.dumps(client_manifest(m), indent=2) + "\n")
        (stage / "README.md").write_text(_readme(top, run, server))
        files = file_table(stage)
        bundle = {"schema": "qdefend.bundle", "schema_version": 1, "name": top, "run": run, "created": now.isoformat(),
                  "qdefend_version": __version__, "device": {"name": "phone-web", "kind": "browser"},
                  "artifact": ARTIFACT, "format": "onnx", "runtime": "onnxruntime-web", "server": server,
                  "files": files}
        (stage / "bundle.json").write_text(json.dumps(bundle, indent=2, sort_keys=True) + "\n")
        _write_tar(stage, out, int(now.timestamp()))
    return out
