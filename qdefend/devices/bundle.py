"""``qdefend bundle RUN --device NAME``: one archive holding all a device needs to run a run's encoder.

Layout of the archive (``qdefend-bundle-<run>-<device>.tar.gz``; other tools rely on it)::

    qdefend-bundle-<run>-<device>/
        encoder.int8.<fmt>     the int8 encoder artifact (tflite or onnx), as exported
        manifest.json          the run's manifest restricted to that artifact (same sha256)
        errors.py release.py   qdefend/edge copied as-is (numpy + stdlib only): the error root,
        manifest.py runtime.py the release steps and wire, the manifest schema, the runtime and
        runner.py              the standalone CLI: encode / --bench / --check
        requirements.txt       pinned for the device's interpreter
        reference/             images.npy (uint8 N x C x H x W), features.npy (int8, release off),
                               reference.json (scale, zero_point, the host interpreter that made them)
        bundle.json            device profile, sha256 + size of every other file, created, versions
        README.md              install and run on the device
        wheels/                (--with-wheels) the device's wheels from `pip download`

``runner.py --check`` on the device recomputes every sha256 and requires the int8 features of the
reference images to be bit-identical to the host's: integer kernels make them so on any CPU.

Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference" (CVPR 2018): the int8 scheme whose integer-only arithmetic makes that parity exact.
"""

from __future__ import annotations

import copy
import datetime as _dt
import gzip
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np

from qdefend import __version__
from qdefend.data import REFERENCE_IMAGES, reference_images
from qdefend.errors import QdefendError

from qdefend.edge.manifest import load_manifest, sha256_file, verify_artifact, write_manifest
from .profiles import DeviceProfile, get_profile
from qdefend.edge.runtime import Runtime, _TFLite

__all__ = ["BUNDLE_SCHEMA", "COPIED_FILES", "REFERENCE_IMAGES", "make_bundle", "extract_bundle", "bundle_top",
           "download_wheels", "reference_images"]

BUNDLE_SCHEMA = "qdefend.bundle"
BUNDLE_SCHEMA_VERSION = 1
PREFIX = "qdefend-bundle-"
COPIED_FILES = ("errors.py", "cpu.py", "release.py", "manifest.py", "runtime.py", "wire.py", "client.py", "runner.py")  # qdefend/edge, as is
_EDGE = Path(__file__).resolve().parent.parent / "edge"  # the device-side files copied into bundles


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "run"


def _reference_runtime(stage: Path, artifact: str, runtime: str):
    """(Runtime, kernels) that compute what `runtime` computes on the device, bit for bit.

    The device's interpreter if it is installed here. tflite-runtime (numpy < 2) usually is not:
    2.14.0 runs int8 graphs on TFLite's builtin kernels, not XNNPACK, and its codes can differ
    from LiteRT's XNNPACK ones by a few LSB (22 of 3,136 on a tiny encoder, up to 6 LSB behind a
    Sigmoid), so its reference is made by LiteRT without the default delegates, which matched
    tflite-runtime 2.14.0 bit for bit on x86."""

    try:
        return Runtime.open(stage, artifact, interpreter=runtime, threads=1), "default"
    except ValueError:
        if runtime != "tflite-runtime":
            raise
    rt = Runtime.open(stage, artifact, interpreter="litert", threads=1)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    def builtin(**kw):
        return Interpreter(experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, **kw)

    rt = Runtime(rt.manifest, rt.run_dir, rt.name, _TFLite(builtin, stage / artifact, 1), rt.interpreter_name,
                 rt.interpreter_version, 1)
    return rt, "builtin (no default delegates, as tflite-runtime 2.14.0)"


def _readme(top: str, profile: DeviceProfile, fmt: str, runtime: str, meta: dict, with_wheels: bool,
            server: str | None = None) -> str:
    install = ("pip install --no-index --find-links wheels -r requirements.txt" if with_wheels
               else "pip install -r requirements.txt")
    numpy_note = ("\ntflite-runtime 2.14.0 was built against numpy 1.x: keep numpy==1.26.4 (requirements.txt "
                  "pins it).\n" if runtime == "tflite-runtime" else "")
    return f"""# {top}

The int8 encoder of run `{meta['run']}` packaged for **{profile.name}** ({profile.cpu}; {profile.os}):
`encoder.int8.{fmt}` run by **{runtime}** with {profile.threads} threads, Python {profile.python_version}.
Made by qdefend {__version__} on {meta['created']}.

## Install (on the device)

```sh
tar xzf {top}.tar.gz && cd {top}
python3 -m venv venv && . venv/bin/activate     # Raspberry Pi OS bookworm refuses a system-wide pip
{install}
pip install pillow                              # optional: PNG/JPEG input to `encode`
```
{numpy_note}
## Check the bundle

```sh
python runner.py --check
```

Recomputes the sha256 of every file (bundle.json, manifest.json), then encodes `reference/images.npy`
without the release transform and requires the int8 features to be bit-identical to
`reference/features.npy` (made on the host by {meta['reference']['interpreter']}; kernels:
{meta['reference']['kernels']}). Prints one JSON line; exit status 0 = passed, 1 = failed (the JSON
says which file or how many values differ).

## Encode images (what the device sends)

```sh
python runner.py encode photo.png more_images/ --out feats.npz
```

Inputs: `.npy` (uint8 C x H x W or H x W x C, or a batch N x C x H x W) or, with Pillow, `.png`/`.jpg`;
the encoder takes {'x'.join(map(str, meta['input_shape']))} (C x H x W) pixels. `feats.npz` holds
`features` (int8, release transform applied: {meta['release'] or 'none'}), `scale`, `zero_point` and
`names`; the cloud reads `(features - zero_point) * scale`.

## Benchmark

```sh
python runner.py --bench --repeats 100 [--batch 1] [--threads {profile.threads}]
```

Latency p50/p90/p99 per call and peak resident memory (budget for {profile.name}: {profile.memory_mb} MB).

## Send features to the cloud head

```sh
python runner.py send photo.png [more images or folders] --url {server or "http://CLOUD:8000"} --token-file token.txt
```

Encodes here, applies the release transform and posts only the int8 features to `qdefend serve`
(which must serve this run: the encoder's sha256 is checked first); prints the labels as one JSON
line. The token may also come from `$QDEFEND_TOKEN`.{" `--url` defaults to " + server + "." if server else ""}
"""


def download_wheels(requirements: list[str], profile: DeviceProfile, dest: Path) -> list[Path]:
    """`pip download` the device's binary wheels of `requirements` (and their dependencies) into dest.

    Needs network access to PyPI; raises QdefendError saying what to do when pip fails."""
    dest.mkdir(parents=True, exist_ok=True)
    req = dest.parent / ".requirements-download.txt"
    req.write_text("\n".join(requirements) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
           "--retries", "1", "--timeout", "20", "--only-binary=:all:", "--python-version", profile.python_version,
           "--implementation", "cp", *[a for p in profile.platforms for a in ("--platform", p)],
           "--dest", str(dest), "-r", str(req)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, 1, "", "pip download timed out after 30 min")
    finally:
        req.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise QdefendError(f"pip download of the {profile.name} wheels failed ({why}): --with-wheels needs "
                           "network access to PyPI when bundling; bundle without it and run `pip install "
                           "-r requirements.txt` on the device instead")
    return sorted(dest.glob("*.whl"))


def archive_path(run_dir: Path, manifest: dict, device: str, out: str | os.PathLike | None) -> tuple[str, str, Path]:
    """(run name, top folder, archive path) of a bundle: `out` is an archive path or a folder
    (default RUN/bundles/), the archive is named after its top folder qdefend-bundle-RUN-DEVICE."""
    run = _safe_name(str(manifest.get("run") or Path(run_dir).resolve().name))
    top = f"{PREFIX}{run}-{device}"
    out = Path(out) if out is not None else Path(run_dir) / "bundles"
    if out.is_dir() or out.suffix == "" and not out.exists():
        out = out / f"{top}.tar.gz"
    return run, top, out


def file_table(stage: Path) -> dict[str, dict]:
    """bundle.json's "files": every file under `stage` (so far) with its sha256 and size."""
    return {p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
            for p in sorted(stage.rglob("*")) if p.is_file()}


def _check_server_url(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or any(c in url for c in "\"'<> "):
        raise QdefendError(f"--server {url!r} must look like https://HOST:PORT (the `qdefend serve` address)")


def _write_tar(stage: Path, out: Path, mtime: int) -> None:
    """A reproducible .tar.gz of `stage` (sorted names, root-owned, fixed modes and times), atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    paths = [stage, *sorted(stage.rglob("*"))]
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for p in paths:
                info = tar.gettarinfo(str(p), arcname=p.relative_to(stage.parent).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = mtime
                info.mode = 0o755 if p.is_dir() or p.name == "runner.py" else 0o644
                if p.is_file():
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def make_bundle(run_dir: str | os.PathLike, device: str | DeviceProfile, fmt: str | None = None,
                runtime: str | None = None, out: str | os.PathLike | None = None,
                with_wheels: bool = False, server: str | None = None) -> Path:
    """Write the device bundle of an exported run; returns the .tar.gz path.

    fmt/runtime default to the device profile's; a runtime without wheels for the device, or
    one that cannot run `fmt`, is refused naming what to pick instead. out: an archive path or a
    folder (default RUN/bundles/). with_wheels: also `pip download` the wheels (needs network).
    server: the `qdefend serve` URL that `runner.py send` (or the phone-web page) talks to by default."""
    profile = get_profile(device)
    if server is not None:
        _check_server_url(server)
    if profile.kind == "browser":
        if fmt not in (None, "onnx") or runtime not in (None, profile.runtime) or with_wheels:
            raise QdefendError(f"{profile.name} runs encoder.int8.onnx in {profile.runtime}: drop --format, "
                               "--runtime and --with-wheels")
        from .web_bundle import make_web_bundle

        return make_web_bundle(run_dir, out, server=server)
    fmt, runtime = profile.choose(fmt, runtime)
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    artifact = f"encoder.int8.{fmt}"
    if artifact not in manifest["artifacts"]:
        have = sorted(n for n in manifest["artifacts"] if n.startswith("encoder.int8."))
        alt = f", or pass --format {have[0].rsplit('.', 1)[1]} (the run has {', '.join(have)})" if have else ""
        raise QdefendError(f"{run_dir} has no {artifact}: run `qdefend export {run_dir} --format onnx,tflite`{alt}")
    src = verify_artifact(run_dir, manifest, artifact)
    run, top, out = archive_path(run_dir, manifest, profile.name, out)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    requirements = profile.requirements(runtime)

    with tempfile.TemporaryDirectory(prefix="qdefend-bundle-") as tmp:
        stage = Path(tmp) / top
        stage.mkdir()
        shutil.copyfile(src, stage / artifact)
        m = copy.deepcopy(manifest)
        m["artifacts"] = {artifact: dict(m["artifacts"][artifact], path=artifact)}
        if isinstance(m.get("verification", {}).get("artifacts"), dict):
            m["verification"]["artifacts"] = {k: v for k, v in m["verification"]["artifacts"].items() if k == artifact}
        write_manifest(stage, m)
        for name in COPIED_FILES:
            shutil.copyfile(_EDGE / name, stage / name)
        (stage / "requirements.txt").write_text("\n".join(requirements) + "\n")

        ref = stage / "reference"
        ref.mkdir()
        images, source = reference_images(run_dir, m["input"]["shape"])
        rt, kernels = _reference_runtime(stage, artifact, runtime)
        feats = rt.encode(images, release=False)
        np.save(ref / "images.npy", images)
        np.save(ref / "features.npy", feats.q)
        ref_meta = {"images": int(len(images)), "source": source, "release": False, "dtype": "int8",
                    "shape": list(feats.shape), "scale": feats.scale, "zero_point": feats.zero_point,
                    "interpreter": f"{rt.interpreter_name} {rt.interpreter_version}", "kernels": kernels,
                    "machine": platform.machine(), "numpy": np.__version__}
        (ref / "reference.json").write_text(json.dumps(ref_meta, indent=2, sort_keys=True) + "\n")

        wheels = download_wheels(requirements, profile, stage / "wheels") if with_wheels else []
        meta = {"run": run, "created": now.isoformat(), "input_shape": m["input"]["shape"],
                "release": ", ".join(f"{s['type']}" for s in m["release"]["steps"]), "reference": ref_meta}
        (stage / "README.md").write_text(_readme(top, profile, fmt, runtime, meta, with_wheels, server))

        files = file_table(stage)
        bundle = {
            "schema": BUNDLE_SCHEMA, "schema_version": BUNDLE_SCHEMA_VERSION, "name": top, "run": run,
            "created": now.isoformat(), "qdefend_version": __version__,
            "device": profile.to_dict(), "artifact": artifact, "format": fmt, "runtime": runtime,
            "threads": profile.threads, "python": profile.python_version, "requirements": requirements,
            "wheels": [w.name for w in wheels], "reference": ref_meta, "files": files, "server": server,
        }
        (stage / "bundle.json").write_text(json.dumps(bundle, indent=2, sort_keys=True) + "\n")
        _write_tar(stage, out, int(now.timestamp()))
    return out


# --------------------------------------------------------------------------------------------
# Reading an archive back


def _members(tar: tarfile.TarFile, archive: Path) -> tuple[str, list[tarfile.TarInfo]]:
    """(top folder, members) after refusing anything that could land outside it."""
    members = tar.getmembers()
    tops = set()
    for m in members:
        p = PurePosixPath(m.name)
        if (not p.parts or m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts
                or "\\" in m.name or ":" in p.parts[0]):
            raise QdefendError(f"{archive}: member {m.name!r} points outside the bundle folder (absolute path "
                               "or '..'): refusing to extract it; rebuild the archive with `qdefend bundle`")
        if not (m.isfile() or m.isdir()):
            raise QdefendError(f"{archive}: member {m.name!r} is a link or special file: refusing to extract "
                               "it; rebuild the archive with `qdefend bundle`")
        tops.add(p.parts[0])
    if len(tops) != 1 or not next(iter(tops)).startswith(PREFIX):
        raise QdefendError(f"{archive}: not a qdefend bundle (expected one top folder {PREFIX}RUN-DEVICE/, got "
                           f"{', '.join(sorted(tops)[:3]) or 'nothing'}): rebuild it with `qdefend bundle`")
    return tops.pop(), members


def _open_tar(archive: Path) -> tarfile.TarFile:
    if not archive.is_file():
        raise QdefendError(f"{archive}: no such file: make it with `qdefend bundle RUN --device NAME`")
    try:
        return tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise QdefendError(f"{archive} is not a .tar.gz bundle ({e}): rebuild it with `qdefend bundle`") from None


def bundle_top(archive: str | os.PathLike) -> str:
    """The top folder name of a bundle archive (its members checked as by extract_bundle)."""
    with _open_tar(Path(archive)) as tar:
        return _members(tar, Path(archive))[0]


def extract_bundle(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a bundle archive into dest; returns dest/<top folder>. Members with absolute paths,
    '..', links or device files, or outside one qdefend-bundle-* folder, are refused before
    anything is written."""
    archive, dest = Path(archive), Path(dest)
    with _open_tar(archive) as tar:
        top, members = _members(tar, archive)
        for m in members:
            target = dest.joinpath(*PurePosixPath(m.name).parts)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            with open(target, "wb") as f:
                shutil.copyfileobj(src if src is not None else io.BytesIO(), f)
            target.chmod(0o755 if m.mode & 0o100 else 0o644)
    return dest / top
