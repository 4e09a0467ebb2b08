"""The phone-browser page's files: what ``qdefend serve`` serves at ``/`` and ``qdefend bundle
--device phone-web`` copies. The page (``web/``) is ours; its runtime is onnxruntime-web's wasm
build from the npm package pinned in ``web/package-lock.json`` (``./dev setup`` runs ``npm ci``),
served from this machine, never from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from qdefend.errors import QdefendError

__all__ = ["WEB_DIR", "PAGE_FILES", "ORT_FILES", "ORT_VERSION", "web_runtime_dir", "ort_file"]

WEB_DIR = Path(__file__).resolve().parent / "web"
PAGE_FILES = {"qdefend.js": "text/javascript", "release.js": "text/javascript", "style.css": "text/css"}
# onnxruntime-web's wasm build: the only files of the npm package the page loads
ORT_FILES = {"ort.wasm.min.mjs": "text/javascript", "ort-wasm-simd-threaded.mjs": "text/javascript",
             "ort-wasm-simd-threaded.wasm": "application/wasm"}
ORT_VERSION = "1.31.1"


def web_runtime_dir(override: str | Path | None = None) -> Path:
    """Where onnxruntime-web's dist files are: `override` (--web-runtime), else the npm install."""
    return Path(override) if override else WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"


def missing_runtime(path: Path) -> str:
    return (f"the browser runtime is not installed ({path} missing): run `npm ci --ignore-scripts --prefix "
            f"{WEB_DIR}` (onnxruntime-web {ORT_VERSION}; `./dev setup` does it) or pass --web-runtime DIR")


def ort_file(name: str, override: str | Path | None = None) -> Path:
    """The path of onnxruntime-web file `name`; QdefendError saying how to install it if missing."""
    path = web_runtime_dir(override) / name
    if not path.is_file():
        raise QdefendError(missing_runtime(path))
    return path
