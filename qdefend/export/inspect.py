"""``qdefend inspect ARTIFACT``: what a user asks first about an exported file.

Is it really int8 (op and tensor dtypes, the kernels onnxruntime picks), how big, how are its
input and output quantized, does it still match its manifest (sha256), and how close is it to the
torch model (the parity figures recorded at export). The file is checked against the manifest of
its run before anything is loaded; a file outside a run is inspected without that check, and the
report says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qdefend.edge.manifest import MANIFEST_NAME, load_manifest, verify_artifact
from qdefend.errors import QdefendError

from .verify import static_checks

__all__ = ["inspect_artifact", "render"]


def _run_of(path: Path) -> tuple[Path | None, dict | None, str]:
    """The run directory and manifest entry name of an artifact file, if it belongs to one."""
    for root in (path.parent.parent, path.parent):
        if (root / MANIFEST_NAME).is_file():
            manifest = load_manifest(root)
            for name, entry in manifest["artifacts"].items():
                if (root / entry["path"]).resolve() == path.resolve():
                    return root, manifest, name
    return None, None, path.name


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """A dict describing ``path`` (.onnx or .tflite); raises QdefendError/ArtifactError on bad input."""
    path = Path(path)
    if not path.is_file():
        raise QdefendError(f"{path}: no such file. Artifacts live in RUN/artifacts/ after `qdefend export RUN`")
    fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix.lower())
    if fmt is None:
        raise QdefendError(f"{path}: not an .onnx or .tflite file; inspect one of RUN/artifacts/*")
    root, manifest, name = _run_of(path)
    info: dict[str, Any] = {"artifact": name, "file": str(path), "format": fmt, "size_bytes": path.stat().st_size}
    if manifest is not None:
        verify_artifact(root, manifest, name)  # tampered or truncated: refused before loading
        entry = manifest["artifacts"][name]
        info.update(run=str(root), sha256=entry["sha256"], sha256_ok=True, role=entry["role"],
                    precision=entry["precision"], input=entry["input"], output=entry["output"],
                    release=manifest["release"]["steps"], wire=manifest["features"]["wire"],
                    verification=manifest.get("verification", {}).get("artifacts", {}).get(name, {}))
        precision = entry["precision"]
    else:
        info["sha256_ok"] = None  # nothing to compare with
        precision = "int8" if ".int8." in path.name else "float"
        info["precision"] = precision
    try:
        info["checks"] = static_checks(path, fmt, precision)
    except QdefendError:
        raise
    except Exception as e:  # the onnx / onnxruntime / LiteRT loaders: garbage, empty or truncated files
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise QdefendError(f"{path} is not a loadable {fmt} model ({why}): it is empty, truncated or another "
                           "kind of file; export it again with `qdefend export RUN`") from None
    float_ref = (manifest or {}).get("artifacts", {}).get("encoder.float.onnx")
    if float_ref and name.startswith("encoder.") and name != "encoder.float.onnx":
        info["size_vs_float_onnx"] = round(info["size_bytes"] / float_ref["size_bytes"], 4)
    return info


def _quant(spec: dict | None) -> str:
    if not spec:
        return "-"
    q = spec.get("quant")
    qs = f", scale {q['scale']:.6g}, zero point {q['zero_point']}" if q else ""
    return f"{spec.get('dtype')} {spec.get('shape')}{qs}"


def render(info: dict[str, Any], console) -> None:
    """Print ``info`` as a few rich tables."""
    from rich.table import Table

    t = Table(title=f"{info['artifact']} ({info['format']})", show_header=False)
    t.add_row("file", info["file"])
    t.add_row("size", f"{info['size_bytes'] / 1024:.1f} KiB"
              + (f"  ({info['size_vs_float_onnx']:.2f}x the float ONNX)" if "size_vs_float_onnx" in info else ""))
    ok = info["sha256_ok"]
    t.add_row("sha256", "matches the manifest" if ok else "not checked (no manifest: file is outside a run)")
    t.add_row("role / precision", f"{info.get('role', '?')} / {info['precision']}")
    checks = info["checks"]
    if "int8_kernels" in checks:
        t.add_row("int8 kernels", "yes" if checks["int8_kernels"] else "[bold red]NO[/]: float MAC ops remain")
    if "input" in info:
        t.add_row("input", _quant(info["input"]))
        t.add_row("output", _quant(info["output"]))
        t.add_row("release transform", ", ".join(f"{s['type']}({', '.join(f'{k}={v}' for k, v in s.items() if k != 'type')})"
                                                 for s in info["release"]) or "none")
        w = info["wire"]
        grid = (f"per channel ({len(w['scale'])} scales)" if isinstance(w["scale"], list)
                else f"scale {w['scale']:.6g}, zero point {w['zero_point']}")
        t.add_row("wire features", f"{w.get('bits', 8)}-bit codes, {grid}, {w.get('order', 'release_then_wire')}")
    console.print(t)

    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    counts = checks.get("ort_op_counts") or checks.get("tflite_op_counts") or {}
    for op, n in counts.items():
        ops.add_row(op, str(n))
    console.print(ops)
    if checks.get("tflite_convs"):
        ct = Table(title="conv dtypes (inputs -> outputs)")
        ct.add_column("op")
        ct.add_column("dtypes")
        for c in checks["tflite_convs"]:
            ct.add_row(c["op"], f"{', '.join(c['inputs'])} -> {', '.join(c['outputs'])}")
        console.print(ct)
    v = info.get("verification") or {}
    if v:
        pt = Table(title="parity vs torch (recorded at export)")
        pt.add_column("figure")
        pt.add_column("value", justify="right")
        for k, val in {**v.get("parity", {}), **{k: x for k, x in v.items() if k != "parity"}}.items():
            pt.add_row(k, f"{val:.6g}" if isinstance(val, float) else str(val))
        console.print(pt)
