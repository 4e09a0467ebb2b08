"""Checks that prove an exported artifact is int8 and computes what the torch model computes.

Static checks (no data): ``onnx.checker`` with full_check; the op counts of the graph
onnxruntime really runs (int8 kernels such as QLinearConv / QGemm present, no float conv or
matmul left); every conv of a .tflite int8 with int8 input and output.

Parity (real test images, release transform OFF so features are deterministic): each artifact is
run through ``qdefend.edge.runtime.Runtime`` (the code a device runs) and compared with the
torch int8 model it came from: error in steps (LSB) of the artifact's int8 output grid, cosine
similarity, and top-1 agreement of the whole pipeline (artifact encoder -> torch head vs torch
int8 encoder -> same head). Test accuracy is reported without and with the release transform.

Why a second LSB figure: an encoder ending in conv -> Sigmoid has a fine output grid (1/256)
behind a coarse pre-activation grid (e.g. 0.2 per step), and Sigmoid's slope of up to 1/4 turns
one pre-activation step into up to ~13 output steps. Integer kernels (bias rounded to int32,
fixed-point requantisation) and torch's float reference legitimately differ by one step near
rounding ties, so "output LSB" can read 13 where the integer arithmetic differs by one step.
:func:`pre_activation_lsb` reports the smallest number of pre-activation steps that explains the
output difference.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from qdefend.edge.release import wire_bits, wire_granularity
import torch

from qdefend.errors import QdefendError

from .onnx import check_onnx, ort_op_counts, pixel_copy_convs
from .tflite import tflite_report

__all__ = [
    "INT8_MAC_OPS", "FLOAT_MAC_OPS", "static_checks", "output_grids", "lsb_parity",
    "pre_activation_lsb", "cosine", "run_batched", "torch_batched", "verify_encoder", "verify_head",
]

INT8_MAC_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
FLOAT_MAC_OPS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _op(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def static_checks(path, fmt: str, precision: str) -> dict[str, Any]:
    """Data-free checks of one artifact file; "int8_kernels" is the verdict for int8 artifacts."""
    if fmt == "onnx":
        counts = ort_op_counts(path)
        out: dict[str, Any] = {"onnx_checker": check_onnx(path), "ort_op_counts": counts}
        if precision == "int8":
            import onnx

            copies = pixel_copy_convs(onnx.load(str(path)))  # float convs that only copy pixels (im2col)
            out["int8_kernels"] = (sum(v for k, v in counts.items() if _op(k) in INT8_MAC_OPS) > 0
                                   and sum(v for k, v in counts.items() if _op(k) in FLOAT_MAC_OPS) <= copies)
            if copies:
                out["pixel_copy_convs"] = copies
        return out
    if fmt == "tflite":
        rep = tflite_report(path)
        out = {"tflite_op_counts": rep["op_counts"], "tflite_tensor_dtypes": rep["tensor_dtypes"],
               "tflite_convs": rep["convs"]}
        if precision == "int8":
            out["int8_io"] = rep["input"]["dtype"] == "int8" and rep["output"]["dtype"] == "int8"
            out["int8_kernels"] = rep["int8_convs"] and out["int8_io"]
        return out
    raise QdefendError(f"unknown artifact format {fmt!r}: use onnx or tflite")


# --------------------------------------------------------------------------------------------
# Grids of a converted (int8 pt2e) graph


def output_grids(converted) -> tuple[dict | None, dict | None]:
    """(output grid, pre-activation grid) of an int8 pt2e graph, as {"scale", "zero_point"}.

    The output grid is the last quantize before the graph's output. The pre-activation grid is
    set when the output comes from a Sigmoid fed by a quantized tensor (the fixed-grid case the
    module docstring describes), else None.
    """
    graph = getattr(converted, "graph", None)
    if graph is None:
        return None, None

    def producer(node, names: tuple[str, ...]):
        if isinstance(node, torch.fx.Node) and node.op == "call_function" and any(
                n in str(node.target) for n in names):
            return node
        return None

    def grid(q) -> dict:
        return {"scale": float(q.args[1]), "zero_point": int(q.args[2])}

    out = next(n for n in graph.nodes if n.op == "output").args[0]
    out = out[0] if isinstance(out, (tuple, list)) else out
    dq = producer(out, ("dequantize_per_tensor",))
    q = producer(dq.args[0], ("quantize_per_tensor",)) if dq is not None else None
    if q is None:
        return None, None
    act = producer(q.args[0], ("aten.sigmoid",))
    pre_dq = producer(act.args[0], ("dequantize_per_tensor",)) if act is not None else None
    return grid(q), (grid(pre_dq) if pre_dq is not None else None)


# --------------------------------------------------------------------------------------------
# Parity figures


def _codes(x: np.ndarray, q: dict) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float32) / np.float32(q["scale"])) + q["zero_point"],
                   -128, 127).astype(np.int32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine similarity of flattened outputs."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)))


def lsb_parity(ref: np.ndarray, got: np.ndarray, grid: dict | None, *, tol_lsb: int = 2) -> dict[str, Any]:
    """Agreement of two float outputs. With an int8 `grid`, errors in its steps (LSB): max,
    mean, 99.99th percentile, share of values and of samples within `tol_lsb`; always the max
    absolute float error and the cosine similarity."""
    ref, got = np.asarray(ref, np.float32), np.asarray(got, np.float32)
    if ref.shape != got.shape:
        raise QdefendError(f"parity needs equal shapes, got {ref.shape} and {got.shape}: re-export the artifact")
    out: dict[str, Any] = {"n": len(ref), "max_abs_error": float(np.abs(ref - got).max(initial=0.0)),
                           "cosine": cosine(ref, got)}
    if grid is not None:
        d = np.abs(_codes(ref, grid) - _codes(got, grid))
        per_sample = d.reshape(len(d), -1).max(1, initial=0)
        out.update({
            "max_abs_lsb": int(d.max(initial=0)), "mean_abs_lsb": float(d.mean()) if d.size else 0.0,
            "p9999_abs_lsb": float(np.percentile(d, 99.99)) if d.size else 0.0,
            f"frac_values_within_{tol_lsb}lsb": float((d <= tol_lsb).mean()) if d.size else 1.0,
            f"frac_samples_within_{tol_lsb}lsb": float((per_sample <= tol_lsb).mean()) if d.size else 1.0,
        })
    return out


def pre_activation_lsb(ref: np.ndarray, got: np.ndarray, out_grid: dict, pre_grid: dict) -> dict[str, Any]:
    """Fewest pre-activation steps explaining each output difference of a quantized Sigmoid.

    f(k) = out-grid code of sigmoid(pre-grid value k), k in [-128, 127], is non-decreasing, so
    the pre-activation codes consistent with an output code c form an interval (codes c that f
    never reaches map to the k whose f(k) is nearest). The error is the gap between the
    intervals of the reference and of the artifact code: 0 when both outputs agree.
    """
    k = np.arange(-128, 128)
    pre = (k - pre_grid["zero_point"]).astype(np.float32) * np.float32(pre_grid["scale"])
    f = _codes(1.0 / (1.0 + np.exp(-pre)), out_grid)
    gap = np.abs(f[None, :] - np.arange(-128, 128)[:, None])  # [code c, k]
    near = gap == gap.min(1, keepdims=True)
    lo = k[near.argmax(1)]
    hi = k[255 - near[:, ::-1].argmax(1)]
    a, b = _codes(ref, out_grid) + 128, _codes(got, out_grid) + 128
    err = np.maximum(0, np.maximum(lo[b] - hi[a], lo[a] - hi[b]))
    return {"max_pre_activation_lsb": int(err.max(initial=0)),
            "frac_values_within_1_pre_activation_lsb": float((err <= 1).mean()) if err.size else 1.0,
            "pre_activation_scale": float(pre_grid["scale"])}


# --------------------------------------------------------------------------------------------
# Batched runners


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """fn over x in chunks of batch_size rows (keeps interpreter buffers small)."""
    outs = [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


@torch.no_grad()
def torch_batched(module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """A torch module over a float32 numpy array, in chunks, returning float32 numpy."""
    return run_batched(lambda c: module(torch.from_numpy(np.ascontiguousarray(c))).float().numpy(), x, batch_size)


# --------------------------------------------------------------------------------------------
# Whole-artifact verification


def _argmax(head, z: np.ndarray) -> np.ndarray:
    return torch_batched(head, z).argmax(1)


def verify_encoder(rt, got: np.ndarray, images: np.ndarray, labels: np.ndarray, *, ref: np.ndarray,
                   ref_preds: np.ndarray, head, grid: dict | None, pre_grid: dict | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """Parity and accuracy of an encoder artifact opened as ``Runtime`` `rt`.

    got: ``rt.run`` on the normalised test images (see :func:`run_batched`); images: the same
    images as uint8 pixels (what a device feeds ``rt.encode``, for the with-release accuracy);
    ref / ref_preds: torch encoder outputs and the torch head's predictions on them; head: the
    torch head both pipelines share.
    """
    out = {"parity": lsb_parity(ref, got, grid)}
    if grid is not None and pre_grid is not None:
        out["parity"].update(pre_activation_lsb(ref, got, grid, pre_grid))
    preds = _argmax(head, got)
    out["top1_agreement"] = float((preds == ref_preds).mean())
    out["test_acc"] = float((preds == labels).mean())
    wire = rt.manifest["features"]["wire"]
    if rt.manifest["release"]["steps"] or wire_bits(wire) < 8 or wire_granularity(wire) != "tensor":
        feats = rt.encode(images, release=True, seed=seed)
        out["test_acc_release"] = float((_argmax(head, feats.dequantize()) == labels).mean())
        out["wire"] = wire_roundtrip(feats)
    return out


def wire_roundtrip(feats) -> dict[str, Any]:
    """The device's features through the wire message and back: bytes per image and whether every
    code came back bit-exactly (what the cloud reads is what the device quantised)."""
    from qdefend.edge import wire as W

    body = W.pack(feats.q, feats.scale, feats.zero_point, "0" * 64, bits=feats.bits)
    back = W.unpack(body)
    per = W.payload_size(int(np.prod(feats.q.shape[1:])), feats.bits)
    return {"bits": feats.bits, "payload_bytes_per_image": per, "body_bytes": len(body), "images": len(feats),
            "roundtrip_exact": bool(np.array_equal(back.q, feats.q) and back.scale == feats.scale
                                    and back.zero_point == feats.zero_point)}


def verify_head(rt, z: np.ndarray, labels: np.ndarray, *, ref_logits: np.ndarray,
                grid: dict | None, float_preds: np.ndarray | None = None) -> dict[str, Any]:
    """Parity and accuracy of a head artifact `rt` on features z against torch logits."""
    got = run_batched(rt.run, z)
    preds = got.argmax(1)
    out = {"parity": lsb_parity(ref_logits, got, grid),
           "top1_agreement": float((preds == ref_logits.argmax(1)).mean()),
           "test_acc": float((preds == labels).mean())}
    if float_preds is not None:
        out["top1_agreement_with_float_head"] = float((preds == float_preds).mean())
    return out
