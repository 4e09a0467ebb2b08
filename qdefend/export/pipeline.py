"""``qdefend export RUN``: a trained run's int8 artifacts, verified, and the manifest that describes them.

Writes into the run directory::

    artifacts/encoder.int8.onnx     QDQ, int8 per-channel weights (onnxruntime: QLinearConv)
    artifacts/encoder.int8.tflite   fully int8, int8 input and output (LiteRT / XNNPACK)
    artifacts/encoder.float.onnx    the float twin (see below): size and accuracy reference
    artifacts/head.float.onnx       the cloud head as trained
    artifacts/head.int8.onnx        the cloud head in int8 (QAT head, or PTQ-calibrated)
    manifest.json                   qdefend/edge/manifest.py schema, with the verification figures

``formats`` picks the encoder's int8 formats; the float encoder and both heads are always ONNX
(the cloud side runs onnxruntime, and the float encoder is the size reference).

Which weights: the int8 encoder is the run's QAT graph converted to int8 (``quant.convert``),
the exact model training evaluated as ``test_acc_int8``. The *float twin* is the float
architecture holding the same trained parameters (conv weights, BN affine and running stats),
without fake quantization: what the network computes with quantization switched off. A run
trained without QAT (``--qat none``) has no int8 ranges: export refuses it unless ``calibrate=N``
asks for post-training calibration of the float encoder on N images of the aux split (the
attacker's split, never used for training or selection), and records a warning. The int8 head
of a run whose head was not QAT-trained is calibrated on the released features of the first
512 aux images.
"""

from __future__ import annotations

import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from qdefend import quant
from qdefend.edge.cpu import MODES, ort_int8_precision
from qdefend.edge.manifest import artifact_entry, write_manifest
from qdefend.errors import QdefendError
from qdefend.models import build_model, count_macs, count_params
from qdefend.run import Run, load_run

from . import verify as V
from .onnx import export_onnx
from .tflite import export_tflite
from qdefend.edge.runtime import Runtime

__all__ = ["FORMATS", "ARTIFACTS", "ACCEPTANCE", "HEAD_CALIBRATION_IMAGES", "export_run", "float_twin"]

FORMATS = ("onnx", "tflite")
ARTIFACTS = ("encoder.int8.onnx", "encoder.int8.tflite", "encoder.float.onnx", "head.float.onnx", "head.int8.onnx")
ACCEPTANCE = {"max_output_lsb": 2, "min_top1_agreement": 0.99, "max_size_ratio": 0.3}
HEAD_CALIBRATION_IMAGES = 512
TOOLS = ("torch", "torchao", "onnx", "onnxscript", "onnxruntime", "litert-torch", "ai-edge-litert", "numpy", "qdefend")
_RELEASE_SEED = 0


def float_twin(run: Run, part: str) -> torch.nn.Module:
    """The float `part` ("encoder"/"head") of the run's architecture holding the trained
    parameters and BN statistics of its (possibly QAT-prepared) module, in eval mode."""
    src = getattr(run.net, part)
    if not (run.net.q_encoder if part == "encoder" else run.net.q_head):
        return src.eval()
    module = getattr(build_model(run.cfg.model, run.data.shape, run.data.num_classes), part)
    state = src.state_dict()
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise QdefendError(f"the QAT {part} has no float parameters {missing[:3]}: was config.toml "
                           "edited after training? Retrain or restore the config.")
    module.load_state_dict({k: state[k] for k in own})
    return module.eval()


def _check_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """("onnx", "tflite") from an iterable or a comma-separated string, as --format takes it."""
    if isinstance(formats, str):
        formats = formats.split(",")
    fmts = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise QdefendError(f"unknown export format(s) {', '.join(bad) or '(none)'}: use --format "
                           f"{','.join(FORMATS)} (or one of them)")
    return fmts


def _int8_encoder(run: Run, calibrate: int | None, notes: list[str]):
    """The prepared (QAT or PTQ-calibrated) encoder and how it was made."""
    if run.quantized:
        if calibrate is not None:
            notes.append(f"--calibrate {calibrate} ignored: the run was trained with QAT, whose int8 "
                            "ranges are used as trained")
        return run.net.encoder, "qat"
    root = run.paths.root if run.paths else "RUN"
    if calibrate is None:
        raise QdefendError(f"{root}: this run has no QAT: retrain with --qat int8, or pass --calibrate N "
                           "for post-training calibration on N aux images (accuracy may drop)")
    n_aux = len(run.data.aux)
    if not 1 <= calibrate <= n_aux:
        raise QdefendError(f"--calibrate {calibrate} is out of range: the aux split has {n_aux} images; "
                           f"use e.g. --calibrate {min(512, n_aux)}")
    x = _normalised(run, run.data.aux, calibrate)
    prepared = quant.prepare_ptq(run.net.encoder, torch.from_numpy(x[:2]))
    quant.calibrate(prepared, (torch.from_numpy(x[i:i + 128]) for i in range(0, len(x), 128)))
    notes.append(f"post-training int8 calibration on {calibrate} aux images (the run was trained "
                    "without QAT): int8 accuracy may drop; retrain with --qat int8 for QAT")
    return prepared, "ptq"


def _normalised(run: Run, split, n: int | None = None) -> np.ndarray:
    idx = slice(0, n) if n is not None else None
    return np.ascontiguousarray(run.data.normalization.apply(split.floats(idx)), np.float32)


def _int8_head(run: Run, enc_int8, head_ref):
    """The int8 cloud head (QAT-trained, i.e. `head_ref`, or PTQ-calibrated on the released
    features of the first aux images) and how it was made."""
    if run.net.q_head:
        return head_ref, "qat"
    z = torch.from_numpy(V.torch_batched(enc_int8, _normalised(run, run.data.aux, HEAD_CALIBRATION_IMAGES)))
    gen = torch.Generator().manual_seed(_RELEASE_SEED)
    z = run.release(z, gen)  # the head sees released features (and the wire grid) in deployment
    prepared = quant.prepare_ptq(run.net.head.eval(), z[:2])
    quant.calibrate(prepared, (z[i:i + 128] for i in range(0, len(z), 128)))
    return quant.convert(prepared), "ptq"


def _tools() -> dict[str, str]:
    out = {}
    for dist in TOOLS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _model_info(run: Run, enc_float, head_float, enc_source: str, head_source: str) -> dict[str, Any]:
    m = run.cfg.model
    return {
        "name": m.name, "cut": m.resolved_cut, "bottleneck_channels": m.bottleneck_channels,
        "sigmoid": m.sigmoid, "width": m.width, "head_width": m.head_width,
        "encoder_params": count_params(enc_float), "encoder_macs": count_macs(enc_float, run.data.shape),
        "head_params": count_params(head_float), "head_macs": count_macs(head_float, run.z_shape),
        "quant": {"scheme": run.cfg.quant.scheme, "quantize_head": run.cfg.quant.quantize_head,
                  "encoder_int8": enc_source, "head_int8": head_source},
        "checkpoint": run.state and f"epoch-{run.state['epoch']:04d}",
        "defense": run.defense.names if hasattr(run.defense, "names") else [],
    }


def export_run(run_dir: str | Path, formats: str | Iterable[str] = FORMATS, *, calibrate: int | None = None,
               progress: Callable[[str], None] | None = None, verify_images: int | None = None) -> dict:
    """Export, verify and describe a trained run; returns the manifest written to run_dir.

    calibrate: for a run trained without QAT, post-training calibration on this many aux images
    (refused without it). progress: called with one line per step. verify_images: use only the
    first N test images for parity and accuracy (default: the whole test split).
    """
    for flag, n in (("--verify-images", verify_images), ("--calibrate", calibrate)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise QdefendError(f"{flag} {n!r} is out of range: it is a number of images >= 1, e.g. {flag} 512 "
                               "(or leave it out)")
    with warnings.catch_warnings():  # torch's exporters trip their own pytree deprecation, per node
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        return _export_run(run_dir, formats, calibrate, progress, verify_images)


def _export_run(run_dir, formats, calibrate, progress, verify_images) -> dict:
    say = progress or (lambda msg: None)
    fmts = _check_formats(formats)
    t0, timings = time.perf_counter(), {}

    def lap(key: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[key] = round(now - t0, 2)
        t0 = now

    run = load_run(run_dir)
    paths = run.paths
    notes: list[str] = []  # the manifest's "warnings"
    prepared, enc_source = _int8_encoder(run, calibrate, notes)
    paths.manifest.unlink(missing_ok=True)  # never leave a manifest describing other files
    art = paths.artifacts
    art.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        (art / name).unlink(missing_ok=True)
    lap("load_s")

    say("converting to int8")
    enc_int8 = quant.convert(prepared, fold_quantize=True)
    enc_float, head_float = float_twin(run, "encoder"), float_twin(run, "head")
    head_ref = run.converted_head()  # the head the torch pipeline (and training's int8 eval) uses
    out_grid, pre_grid = V.output_grids(enc_int8)
    head_int8, head_source = _int8_head(run, enc_int8, head_ref)
    lap("convert_s")

    x_ex = torch.from_numpy(_normalised(run, run.data.test, 2))
    with torch.no_grad():
        z_ex = enc_int8(x_ex)
    specs: dict[str, dict] = {}
    sources = {"encoder.int8.onnx": enc_source, "encoder.int8.tflite": enc_source,
               "encoder.float.onnx": "float twin", "head.float.onnx": "float",
               "head.int8.onnx": head_source}
    if "onnx" in fmts:
        say("exporting encoder.int8.onnx")
        specs["encoder.int8.onnx"] = export_onnx(enc_int8, x_ex, art / "encoder.int8.onnx", output_name="features")
        lap("encoder_int8_onnx_s")
    if "tflite" in fmts:
        say("exporting encoder.int8.tflite")
        specs["encoder.int8.tflite"] = export_tflite(prepared, x_ex, art / "encoder.int8.tflite")
        lap("encoder_int8_tflite_s")
    say("exporting the float encoder and the heads (ONNX)")
    specs["encoder.float.onnx"] = export_onnx(enc_float, x_ex, art / "encoder.float.onnx", output_name="features")
    specs["head.float.onnx"] = export_onnx(head_float, z_ex, art / "head.float.onnx", output_name="logits")
    specs["head.int8.onnx"] = export_onnx(head_int8, z_ex, art / "head.int8.onnx", output_name="logits")
    lap("float_and_heads_onnx_s")

    say("checking the artifacts (onnx.checker, onnxruntime kernels, TFLite dtypes)")
    entries = {}
    for name, spec in specs.items():
        fmt, precision = name.rsplit(".", 1)[1], name.split(".")[1]
        extra = {k: spec[k] for k in ("opset", "op_counts", "rewrites") if spec.get(k)}
        extra["source"] = sources[name]
        extra["checks"] = V.static_checks(art / name, fmt, precision)
        entries[name] = artifact_entry(paths.root, f"artifacts/{name}", format=fmt, role=name.split(".")[0],
                                       precision=precision, input=spec["input"], output=spec["output"], **extra)
    lap("static_checks_s")

    steps = (run.defense.release_spec() or {"steps": []})["steps"]
    manifest = {
        "run": paths.root.resolve().name,
        "model": _model_info(run, enc_float, head_float, enc_source, head_source),
        "dataset": {"name": run.data.name, "num_classes": run.data.num_classes,
                    "class_names": list(run.data.class_names)},
        "input": {"shape": list(run.data.shape), "dtype": "float32", "range": [0.0, 1.0], "layout": "NCHW",
                  "normalization": run.data.normalization.to_dict()},
        "features": {"shape": list(run.z_shape),
                     "wire": run.wire_grid(out_grid)},
        "release": {"steps": steps},
        "artifacts": entries,
        "tools": _tools(),
        "warnings": notes,
        "verification": {"status": "pending"},
    }
    write_manifest(paths.root, manifest)  # the runtime opens artifacts through the manifest

    say("verifying parity and accuracy on the test split")
    manifest["verification"] = _verify(run, paths.root, entries, enc_int8, enc_float, head_ref, head_float,
                                       head_int8, out_grid, pre_grid, verify_images, say)
    manifest["verification"]["status"] = "verified"
    lap("verify_s")
    manifest["verification"]["timings_s"] = dict(timings, total_s=round(sum(timings.values()), 2))
    write_manifest(paths.root, manifest)
    return manifest


def _verify(run: Run, root: Path, entries: dict, enc_int8, enc_float, head_ref, head_float, head_int8,
            out_grid, pre_grid, limit: int | None, say) -> dict[str, Any]:
    """Every artifact run through the device runtime on the test split against its torch model:
    int8 encoders vs the converted encoder, the float encoder vs the float twin, heads on the
    torch int8 features; plus the two int8 encoders against each other, sizes and acceptance."""

    test = run.data.test
    n = len(test) if limit is None else min(limit, len(test))
    x, images, labels = _normalised(run, test, n), test.images[:n], test.labels[:n]
    threads = torch.get_num_threads()
    z_int8 = V.torch_batched(enc_int8, x)
    preds_ref = V.torch_batched(head_ref, z_int8).argmax(1)
    z_float = V.torch_batched(enc_float, x)
    preds_float = V.torch_batched(head_float, z_float).argmax(1)
    out: dict[str, Any] = {
        "test_split": {"dataset": run.data.name, "images": n},
        "release_off_for_parity": True,
        "torch": {"test_acc_int8": float((preds_ref == labels).mean()),
                  "test_acc_float_twin": float((preds_float == labels).mean())},
        "artifacts": {},
    }
    grids = {"encoder.int8.onnx": (out_grid, pre_grid), "encoder.int8.tflite": (out_grid, pre_grid),
             "encoder.float.onnx": (None, None)}
    int8_features = {}
    for name in entries:
        say(f"  {name}")
        rt = Runtime.open(root, name, threads=threads)
        if name.startswith("encoder."):
            float_enc = name == "encoder.float.onnx"
            got = V.run_batched(rt.run, x)
            if not float_enc:
                int8_features[name] = got
            out["artifacts"][name] = V.verify_encoder(
                rt, got, images, labels, ref=z_float if float_enc else z_int8,
                ref_preds=preds_float if float_enc else preds_ref, head=head_float if float_enc else head_ref,
                grid=grids[name][0], pre_grid=grids[name][1], seed=_RELEASE_SEED)
            if rt.int8_precision is not None:
                out["artifacts"][name]["ort_int8_precision"] = rt.int8_precision["mode"]
        elif name == "head.float.onnx":
            out["artifacts"][name] = V.verify_head(rt, z_int8, labels, ref_logits=V.torch_batched(head_float, z_int8),
                                                   grid=None)
        else:
            hgrid, _ = V.output_grids(head_int8)
            out["artifacts"][name] = V.verify_head(rt, z_int8, labels, ref_logits=V.torch_batched(head_int8, z_int8),
                                                   grid=hgrid, float_preds=preds_ref)
    if "encoder.int8.onnx" in entries:  # ONNX Runtime's int8 modes (edge/cpu.py), each against torch
        out["ort_int8_precision"] = _ort_modes(root, x, z_int8, int8_features.get("encoder.int8.onnx"), out_grid,
                                               threads)
    if len(int8_features) == 2:  # the two int8 runtimes against each other (integer kernels both)
        a, b = int8_features.values()
        out["onnx_vs_tflite"] = V.lsb_parity(a, b, out_grid)
    out["size_ratio"] = {name: round(entries[name]["size_bytes"] / entries["encoder.float.onnx"]["size_bytes"], 4)
                         for name in entries if name.startswith("encoder.int8")}
    out["acceptance"] = _acceptance(out)
    return out


def _ort_modes(root: Path, x: np.ndarray, z_int8: np.ndarray, chosen_out, out_grid, threads: int) -> dict[str, Any]:
    """encoder.int8.onnx in both of ONNX Runtime's int8 modes on this CPU: each one's parity with the
    torch int8 encoder, whether they agree bit for bit, and which one the runtime chose (and why)."""
    chosen = ort_int8_precision()
    res: dict[str, Any] = {"chosen": chosen["mode"], "source": chosen["source"], "reason": chosen["reason"],
                           "modes": {}}
    outs = {}
    for mode in MODES:
        got = chosen_out if mode == chosen["mode"] and chosen_out is not None else V.run_batched(
            Runtime.open(root, "encoder.int8.onnx", threads=threads, int8_precision=mode).run, x)
        outs[mode] = got
        p = V.lsb_parity(z_int8, got, out_grid)
        res["modes"][mode] = {k: p[k] for k in ("max_abs_lsb", "mean_abs_lsb", "cosine") if k in p}
    res["modes_bit_identical"] = bool(np.array_equal(outs["fast"], outs["precise"]))
    return res


def _acceptance(v: dict) -> dict[str, Any]:
    """The issue's criteria, pass/fail per int8 encoder artifact (the figures are beside them)."""
    res: dict[str, Any] = {"criteria": dict(ACCEPTANCE)}
    ok = True
    for name, ratio in v["size_ratio"].items():
        a = v["artifacts"][name]
        p = a["parity"]
        checks = {
            "max_output_lsb": p["max_abs_lsb"] <= ACCEPTANCE["max_output_lsb"],
            "top1_agreement": a["top1_agreement"] >= ACCEPTANCE["min_top1_agreement"],
            "size_ratio": ratio <= ACCEPTANCE["max_size_ratio"],
        }
        if "max_pre_activation_lsb" in p:
            checks["max_pre_activation_lsb_le_1"] = p["max_pre_activation_lsb"] <= 1
        res[name] = checks
        ok = ok and checks["top1_agreement"] and checks["size_ratio"] and (
            checks["max_output_lsb"] or checks.get("max_pre_activation_lsb_le_1", False))
    res["passed"] = ok
    res["note"] = ("passed = top-1 agreement and size ratio, and parity within 2 output LSB or, behind a "
                   "quantized Sigmoid, within 1 pre-activation LSB (see qdefend.export.verify)")
    return res
