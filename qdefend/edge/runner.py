#!/usr/bin/env python3
"""Standalone runner of a qdefend device bundle: encode images, benchmark, check the bundle.

Copied into every bundle made by ``qdefend bundle`` next to ``runtime.py`` and ``manifest.py``. It
needs Python 3.9+, numpy (1.26 or 2.x) and the bundle's interpreter (see requirements.txt); never
torch or qdefend. Pillow is optional (PNG/JPEG input)::

    python runner.py --check                          bundle integrity + bit-exact parity, one JSON line
    python runner.py encode IMG_OR_DIR... --out feats.npz [--seed N] [--no-release]
    python runner.py --bench [--repeats N] [--batch B]
    python runner.py send IMG_OR_DIR... [--url URL] [--token-file F] [--seed N]

``send`` encodes on the device as ``encode`` does and posts only the int8 features to a ``qdefend
serve`` endpoint (--url, or the "server" recorded by ``qdefend bundle --server``; token from
--token-file or $QDEFEND_TOKEN), then prints the cloud head's labels as one JSON line.

``encode`` writes what the device sends: int8 features (release transform applied) plus their
scale/zero-point. ``--check`` recomputes the sha256 of every file listed in bundle.json and the
artifact's sha256 in manifest.json, then runs the reference images without the release transform
and requires the int8 features to equal, bit for bit, those the host's runtime stored at bundling.
It prints one JSON line and exits 0 (passed) or 1. Other user errors print one line and exit 2.

Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference" (CVPR 2018): integer-only kernels give the same int8 codes on every CPU, which is
what the parity check relies on.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # keep the bundle folder as shipped (no __pycache__ beside it)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BUNDLE_JSON = "bundle.json"
IMAGE_SUFFIXES = (".npy", ".png", ".jpg", ".jpeg", ".bmp")


class RunnerError(Exception):
    """A user mistake or a broken bundle; the message is one line saying what to do."""


# --------------------------------------------------------------------------------------------
# The bundle


def _sha256(path: Path) -> str:
    """Hex sha256 (not manifest.sha256_file: nothing from the bundle runs before its files are verified)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(root: Path) -> dict:
    path = root / BUNDLE_JSON
    if not path.is_file():
        raise RunnerError(f"no {BUNDLE_JSON} in {root}: run runner.py inside an extracted bundle "
                          "(made by `qdefend bundle RUN --device NAME`)")
    try:
        b = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RunnerError(f"{path} is not valid JSON ({e}): copy the bundle again") from None
    if not isinstance(b, dict) or b.get("schema") != "qdefend.bundle" or not isinstance(b.get("files"), dict):
        raise RunnerError(f"{path} is not a qdefend bundle description: copy the bundle again")
    return b


def check_files(root: Path, bundle: dict) -> tuple[int, list[str]]:
    """(files checked, problems): every file of bundle.json against its sha256, and the artifact
    against manifest.json. Only the standard library: runs before anything from the bundle is imported."""
    bad: dict[str, str] = {}
    for rel, meta in sorted(bundle["files"].items()):
        p = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            bad[rel] = "path outside the bundle"
        elif not p.is_file():
            bad[rel] = "missing"
        elif p.stat().st_size != meta.get("size_bytes", p.stat().st_size) or _sha256(p) != meta.get("sha256"):
            bad[rel] = "sha256 differs from bundle.json: modified or corrupted"
    art = bundle.get("artifact")
    try:
        entry = json.loads((root / "manifest.json").read_text(encoding="utf-8"))["artifacts"][art]
        path = root / entry["path"]
        if entry["path"] not in bad and path.is_file() and _sha256(path) != entry["sha256"]:
            bad[entry["path"]] = "sha256 differs from manifest.json"
    except (OSError, ValueError, KeyError, TypeError):
        bad.setdefault("manifest.json", f"unreadable or without an entry for {art}")
    return len(bundle["files"]), [f"{k} ({v})" for k, v in bad.items()]


def _modules():
    """numpy and the bundle's runtime module, imported only when needed."""
    try:
        import numpy as np
    except ImportError:
        raise RunnerError("numpy is not installed: pip install -r requirements.txt") from None
    try:
        from . import runtime as rt  # inside the qdefend source tree
    except ImportError:
        import runtime as rt  # the copy beside this file in a bundle
    return np, rt


def _client_module():
    try:
        from . import client  # inside the qdefend source tree
    except ImportError:
        import client  # the copy beside this file in a bundle
    return client


def open_runtime(root: Path, bundle: dict, interpreter: str | None, threads: int | None):
    np, rt = _modules()
    name = interpreter or bundle.get("runtime", "auto")
    try:
        return rt.Runtime.open(root, bundle["artifact"], interpreter=name,
                               threads=threads if threads is not None else bundle.get("threads"))
    except rt.ArtifactError as e:
        hint = "" if name == "auto" else " (or pass --interpreter auto to use any installed one)"
        raise RunnerError(f"{e}{hint}") from None


# --------------------------------------------------------------------------------------------
# Images


def _fit(a, name: str, shape: list[int]):
    """(N, C, H, W) from one image (H,W), (C,H,W), (H,W,C) or a batch (N,C,H,W), (N,H,W,C)."""
    np, _ = _modules()
    c, h, w = shape
    s = a.shape
    if a.ndim == 2 and s == (h, w) and c == 1:
        return a[None, None]
    if a.ndim == 3:
        if s == (c, h, w):
            return a[None]
        if s == (h, w, c):
            return np.moveaxis(a, -1, 0)[None]
    if a.ndim == 4:
        if s[1:] == (c, h, w):
            return a
        if s[1:] == (h, w, c):
            return np.moveaxis(a, -1, 1)
    if a.ndim == 2:
        gh, gw, gc = s[0], s[1], 1
    elif a.ndim in (3, 4):
        t = s[-3:]
        chw = t[0] in (1, 2, 3, 4) and t[0] < t[2]
        gc, gh, gw = t if chw else (t[2], t[0], t[1])
    else:
        raise RunnerError(f"{name}: array of shape {s} is not an image; the encoder takes {c}x{h}x{w} (C x H x W)")
    what = []
    if (gh, gw) != (h, w):
        what.append(f"resize it to {h}x{w}")
    if gc != c:
        what.append(f"convert it to {c} channel{'s' * (c != 1)}{' (greyscale)' * (c == 1)}")
    raise RunnerError(f"{name}: image is {gh}x{gw} with {gc} channel{'s' * (gc != 1)}, the encoder takes "
                      f"{h}x{w} with {c}: {' and '.join(what) or 'use C x H x W or H x W x C layout'}")


def _read_pil(path: Path, c: int):
    np, _ = _modules()
    try:
        from PIL import Image
    except ImportError:
        raise RunnerError(f"{path}: reading {path.suffix} images needs Pillow (pip install pillow); or save "
                          "the image as .npy (uint8, C x H x W)") from None
    with Image.open(path) as im:
        if im.mode in ("1", "P"):
            im = im.convert("L" if c == 1 else "RGB")
        if im.mode not in ("L", "RGB", "LA", "RGBA"):
            raise RunnerError(f"{path}: {im.mode} images are not supported: save it as 8-bit greyscale or RGB")
        a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a  # H, W, C


def load_images(inputs: list[str], shape: list[int]):
    """(uint8 or float array N x C x H x W, names) from image files and folders of them."""
    np, _ = _modules()
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise RunnerError(f"{p}: no {', '.join(IMAGE_SUFFIXES)} files in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise RunnerError(f"{p}: no such file or folder")
    arrays, names = [], []
    for f in files:
        if f.suffix.lower() == ".npy":
            try:
                a = np.load(f, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise RunnerError(f"{f}: not a readable .npy array ({e})") from None
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            a = _read_pil(f, shape[0])
        else:
            raise RunnerError(f"{f}: unsupported file type {f.suffix!r}; use .npy or .png")
        if a.dtype != np.uint8 and a.dtype.kind != "f":
            raise RunnerError(f"{f}: pixels must be uint8 [0, 255] or float [0, 1], got {a.dtype}")
        a = a if a.dtype == np.uint8 else a.astype(np.float32)
        a = _fit(a, str(f), shape)
        arrays.append(a)
        names += [f.name] if len(a) == 1 else [f"{f.name}[{i}]" for i in range(len(a))]
    dtypes = {a.dtype for a in arrays}
    batch = np.concatenate([a.astype(np.float32) / (255 if a.dtype == np.uint8 else 1) for a in arrays]
                           if len(dtypes) > 1 else arrays)
    return np.ascontiguousarray(batch), names


# --------------------------------------------------------------------------------------------
# Commands


def cmd_encode(root: Path, bundle: dict, args) -> dict:
    np, _ = _modules()
    r = open_runtime(root, bundle, args.interpreter, args.threads)
    x, names = load_images(args.inputs, r.manifest["input"]["shape"])
    try:
        f = r.encode(x, release=not args.no_release, seed=args.seed)
    except ValueError as e:  # ArtifactError: pixels out of range, ...
        raise RunnerError(str(e)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:
        np.savez(fh, features=f.q, scale=np.float64(f.scale), zero_point=np.int32(f.zero_point),
                 bits=np.int32(f.bits), names=np.array(names))
    return {"out": str(out), "images": len(names), "shape": list(f.shape), "dtype": "int8", "bits": f.bits,
            "scale": f.scale, "zero_point": f.zero_point, "release": not args.no_release,
            "interpreter": r.interpreter_name}


def cmd_send(root: Path, bundle: dict, args) -> dict:
    import os

    cl = _client_module()
    url = args.url or bundle.get("server")
    if not url:
        raise RunnerError("no server: pass --url http://HOST:PORT (or bundle with `qdefend bundle --server URL`)")
    try:
        token = cl.read_token(args.token_file) if args.token_file else os.environ.get("QDEFEND_TOKEN") or None
    except ValueError as e:
        raise RunnerError(str(e)) from None
    r = open_runtime(root, bundle, args.interpreter, args.threads)
    x, names = load_images(args.inputs, r.manifest["input"]["shape"])
    sha = r.entry["sha256"]
    t0 = time.perf_counter()
    try:
        c = cl.Client(url, token=token, timeout=args.timeout)
        c.check_encoder(sha, r.name)
        f = r.encode(x, seed=args.seed)
        t1 = time.perf_counter()
        ans = c.infer(f, encoder_sha256=sha)
    except ValueError as e:  # ClientError, ArtifactError: one line each
        raise RunnerError(str(e)) from None
    t2 = time.perf_counter()
    answers = [{"name": n, "label": lab, "class": cls, "p": round(max(p), 4)}
               for n, lab, cls, p in zip(names, ans["labels"], ans["classes"], ans["probabilities"])]
    return {"url": url, "images": len(names), "encoder": r.name, "interpreter": r.interpreter_name,
            "bytes_sent": -(-int(f.q.size) * f.bits // 8), "encode_ms": round((t1 - t0) * 1e3, 2),
            "round_trip_ms": round((t2 - t1) * 1e3, 2), "answers": answers}


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB elsewhere


def cmd_bench(root: Path, bundle: dict, args) -> dict:
    np, _ = _modules()
    if args.repeats < 1 or args.batch < 1:
        raise RunnerError("--repeats and --batch must be >= 1, e.g. --repeats 100 --batch 1")
    r = open_runtime(root, bundle, args.interpreter, args.threads)
    ref = root / "reference" / "images.npy"
    shape = r.manifest["input"]["shape"]
    x = np.load(ref) if ref.is_file() else np.random.default_rng(0).integers(0, 256, (8, *shape), dtype=np.uint8)
    x = np.resize(x, (args.batch, *shape))  # repeats the reference images up to the batch
    for _ in range(max(3, args.repeats // 10)):  # warm-up: allocation, XNNPACK packing
        r.encode(x)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r.encode(x)  # the release transform on: what the device does per request
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    peak = _peak_rss_mb()
    budget = bundle.get("device", {}).get("memory_mb")
    return {"bench": True, "interpreter": r.interpreter_name, "interpreter_version": r.interpreter_version,
            "threads": r.threads, "batch": args.batch, "repeats": args.repeats,
            "latency_ms": {k: round(float(np.percentile(t, q)), 4) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))},
            "mean_ms": round(float(t.mean()), 4), "images_per_s": round(args.batch * 1e3 / float(np.median(t)), 1),
            "peak_rss_mb": peak, "memory_budget_mb": budget,
            "within_budget": None if peak is None or budget is None else peak <= budget}


def cmd_check(root: Path, bundle: dict, args) -> dict:
    n, bad = check_files(root, bundle)
    res: dict = {"files_checked": n}
    if bad:
        res["error"] = (f"{len(bad)} file{'s' * (len(bad) > 1)} failed the integrity check: {'; '.join(bad)}: "
                        "copy the bundle again")
        return res
    np, _ = _modules()
    r = open_runtime(root, bundle, args.interpreter, args.threads)
    res.update(interpreter=r.interpreter_name, interpreter_version=r.interpreter_version)
    refdir = root / "reference"
    meta = json.loads((refdir / "reference.json").read_text(encoding="utf-8"))
    x, want = np.load(refdir / "images.npy"), np.load(refdir / "features.npy")
    f = r.encode(x, release=False)
    same_grid = (f.scale, f.zero_point) == (meta["scale"], meta["zero_point"])
    diff = np.abs(f.q.astype(np.int16) - want.astype(np.int16)) if f.q.shape == want.shape else None
    res["parity"] = {"images": int(len(x)), "values": int(want.size),
                     "mismatches": None if diff is None else int((diff > 0).sum()),
                     "max_abs_lsb": None if diff is None else int(diff.max(initial=0)),
                     "same_quant_params": same_grid,
                     "bit_identical": bool(diff is not None and same_grid and not diff.any()),
                     "reference_interpreter": meta.get("interpreter")}
    if not res["parity"]["bit_identical"]:
        p = res["parity"]
        res["error"] = (f"parity failed: {p['mismatches']} of {p['values']} int8 features differ from the "
                        f"reference (max {p['max_abs_lsb']} LSB; quant params equal: {same_grid})"
                        if diff is not None else f"features shape {list(f.q.shape)} differs from the "
                        f"reference {list(want.shape)}")
    return res


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bundle", default=None, help="bundle folder (default: the one holding runner.py)")
    common.add_argument("--interpreter", default=None,
                        help="litert, tflite-runtime, onnxruntime or auto (default: the bundle's runtime)")
    common.add_argument("--threads", type=int, default=None, help="interpreter threads (default: the device profile's)")
    top = argparse.ArgumentParser(prog="runner.py", parents=[common], description=__doc__.split("\n\n")[0])
    mode = top.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="verify the bundle's files and int8 parity; one JSON line")
    mode.add_argument("--bench", action="store_true", help="latency p50/p90/p99 and peak memory; one JSON line")
    top.add_argument("--repeats", type=int, default=50, help="--bench: timed calls (default 50)")
    top.add_argument("--batch", type=int, default=1, help="--bench: images per call (default 1)")
    enc = argparse.ArgumentParser(prog="runner.py encode", parents=[common],
                                  description="int8 features of images (.npy, or .png with Pillow), release applied")
    enc.add_argument("inputs", nargs="+", help="image files or folders")
    enc.add_argument("--out", required=True, help="output .npz: features (int8 codes), scale, zero_point, bits, names")
    enc.add_argument("--seed", type=int, default=None, help="seed the release noise (default: fresh randomness)")
    enc.add_argument("--no-release", action="store_true", help="skip the release transform (testing only)")
    send = argparse.ArgumentParser(prog="runner.py send", parents=[common],
                                   description="encode images here, send the int8 features to qdefend serve")
    send.add_argument("inputs", nargs="+", help="image files or folders")
    send.add_argument("--url", default=None, help="the server, e.g. http://cloud:8000 (default: bundle.json's)")
    send.add_argument("--token-file", default=None, help="file holding the server's bearer token "
                      "(default: $QDEFEND_TOKEN)")
    send.add_argument("--seed", type=int, default=None, help="seed the release noise (default: fresh randomness)")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer (default 30)")
    return top, enc, send


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top, enc, send = _parser()
    if argv and argv[0] in ("check", "bench"):
        argv[0] = "--" + argv[0]
    sub = argv[0] if argv and argv[0] in ("encode", "send") else None
    encoding = sub is not None  # one JSON line on success, one error line on stderr otherwise
    args = {"encode": enc, "send": send}[sub].parse_args(argv[1:]) if sub else top.parse_args(argv)
    root = Path(args.bundle).resolve() if args.bundle else Path(__file__).resolve().parent
    checking = not encoding and args.check
    res: dict = {"ok": False, "bundle": root.name}
    try:
        bundle = load_bundle(root)
        res.update(device=bundle.get("device", {}).get("name"), artifact=bundle.get("artifact"))
        if encoding:
            res.update((cmd_send if sub == "send" else cmd_encode)(root, bundle, args))
        else:
            res.update((cmd_check if checking else cmd_bench)(root, bundle, args))
        res["ok"] = "error" not in res
    except RunnerError as e:
        if not checking:
            print(f"error: {e}", file=sys.stderr)
            return 2
        res["error"] = str(e)
    except Exception as e:  # an interpreter crash or a broken file: still one JSON line for --check
        if not checking:
            raise
        res["error"] = f"{type(e).__name__}: {e}"
    if checking or not encoding:
        np_version = sys.modules["numpy"].__version__ if "numpy" in sys.modules else None
        res.update(python=platform.python_version(), machine=platform.machine(), numpy=np_version)
    print(json.dumps(res, sort_keys=True))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
