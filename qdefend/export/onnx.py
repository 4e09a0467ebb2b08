"""ONNX export of a float module or an int8 pt2e graph, and what onnxruntime makes of it.

An int8 model is exported from ``quant.convert(prepared, fold_quantize=True)``: the dynamo
exporter (``torch.onnx.export(..., dynamo=True)``) writes it as QDQ (QuantizeLinear /
DequantizeLinear around float ops, int8 per-channel weights stored as int8 initializers), which
onnxruntime fuses into integer kernels (QLinearConv, QLinearSigmoid, ...). The legacy
TorchScript exporter cannot translate the quantized_decomposed ops. Inputs and outputs stay
float32: the graph quantises its input onto the first activation grid and dequantises its output,
and :func:`io_quant` reads those grids back so the manifest can record them.

The written file is post-processed: the exporter's per-node metadata (stack traces with local
paths; a quarter of a small encoder's bytes) is dropped, and every weight gets its own
scale/zero-point initializers (see :func:`_unshare_weight_qparams`).

onnxruntime's default int8 conv on x86 CPUs with AVX2 but without VNNI sums u8 x s8 pairs in 16
bits, which saturate: on such a CPU the fused graph of a trained encoder was off by up to 164
output steps. ``session.x64quantprecision=1`` switches to its saturation-free path (weights
rewritten to u8) at no measured speed cost, and changes nothing on VNNI or ARM CPUs; every
session made here sets it, as ``qdefend/edge/runtime.py`` does.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdefend import quant  # noqa: F401  (sets TORCHAO_FORCE_SKIP_LOADING_SO_FILES before torchao loads)
from qdefend.errors import QdefendError

__all__ = [
    "ORT_SESSION_CONFIG", "graph_kind", "export_onnx", "check_onnx", "io_quant", "op_counts",
    "ort_session", "ort_op_counts",
]

ORT_SESSION_CONFIG = {"session.x64quantprecision": "1"}  # exact int8 kernels on AVX2-only x86
_QD = "quantized_decomposed"
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8"}


def graph_kind(module: nn.Module) -> str:
    """"prepared" (fake-quant/observers inserted), "converted" (int8 pt2e graph) or "float"."""
    from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase

    if any(isinstance(m, (FakeQuantizeBase, ObserverBase)) for m in module.modules()):
        return "prepared"
    graph = getattr(module, "graph", None)
    if graph is not None and any(_QD in str(n.target) for n in graph.nodes if n.op == "call_function"):
        return "converted"
    return "float"


def _batch_example(example: torch.Tensor) -> torch.Tensor:
    """torch.export specialises batch sizes 0 and 1: give the exporter at least 2 rows."""
    if example.shape[0] >= 2:
        return example.detach()
    return example[:1].detach().expand(2, *example.shape[1:]).contiguous()


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                dynamic_batch: bool = True, input_name: str = "input",
                output_name: str = "output", pad_channels: bool = True) -> dict[str, Any]:
    """Write `module` (float, or an int8 graph from ``quant.convert(..., fold_quantize=True)``)
    to `path` as one self-contained ONNX file; returns {"opset", "op_counts", "input", "output"}.

    input/output are manifest tensor specs; for an int8 graph their "quant" is the grid the graph
    quantises its float input onto / its output lies on (see :func:`io_quant`). pad_channels: for
    an int8 graph, apply the exact :func:`im2col_first_conv` where it applies, else
    :func:`pad_first_conv_channels` ("rewrites" lists what was done).
    """
    kind = graph_kind(module)
    if kind == "prepared":
        raise QdefendError("export_onnx got a QAT/PTQ-prepared graph: convert it first with "
                           "qdefend.quant.convert(prepared, fold_quantize=True)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _batch_example(example) if dynamic_batch else example.detach()
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    if kind == "float":
        module.eval()  # converted graphs are in eval mode already and refuse .eval()
    # the exporter prints progress lines and warns that torchvision ops are not registered
    with contextlib.redirect_stdout(io.StringIO()), _quiet_logger("torch.onnx._internal.exporter"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree LeafSpec deprecation inside torch
        torch.onnx.export(module, (x,), str(path), dynamo=True, dynamic_shapes=shapes,
                          input_names=[input_name], output_names=[output_name],
                          external_data=False, verbose=False)
    import onnx

    model = onnx.load(str(path))
    _unshare_weight_qparams(model)
    rewrites = []
    if pad_channels and kind != "float" and (note := im2col_first_conv(model) or pad_first_conv_channels(model)):
        rewrites.append(note)
    _strip_metadata(model)
    onnx.save(model, str(path))
    in_q, out_q = io_quant(model)
    return {
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "op_counts": op_counts(model), "rewrites": rewrites,
        "input": _spec(model.graph.input[0], in_q, dynamic_batch),
        "output": _spec(model.graph.output[0], out_q, dynamic_batch),
    }


@contextlib.contextmanager
def _quiet_logger(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _strip_metadata(model) -> None:
    """Drop the exporter's per-node metadata (FX node text, module path, Python stack trace with
    local file paths): a quarter of a small encoder's file, and nothing a runtime reads."""
    g = model.graph
    for item in (*g.node, *g.input, *g.output, *g.value_info, *g.initializer):
        del item.metadata_props[:]
    for node in g.node:
        node.doc_string = ""


def _unshare_weight_qparams(model) -> int:
    """Give every weight DequantizeLinear its own scale/zero-point initializers; returns #copies.

    The exporter's optimiser merges equal constants, so two convs with the same channel count
    share one all-zero zero-point tensor; onnxruntime's exact-AVX2 pass
    (session.x64quantprecision) rewrites each weight's zero point in place and then fails with
    "AddInitializedOrtValue Attempt to replace the existing tensor" on the shared one.
    """
    inits = {t.name: t for t in model.graph.initializer}
    users = collections.Counter(i for n in model.graph.node for i in n.input)
    copies = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        for k in range(1, len(node.input)):
            name = node.input[k]
            if name in inits and users[name] > 1:
                t = type(inits[name])()
                t.CopyFrom(inits[name])
                t.name = f"{node.input[0]}_{'scale' if k == 1 else 'zero_point'}"
                model.graph.initializer.append(t)
                users[name] -= 1
                node.input[k] = t.name
                copies += 1
    return copies


PAD_CHANNELS_TO = 4  # int8 dot products take 4 bytes at a time (x86 VNNI vpdpbusd, ARM sdot)
IM2COL_MAX_K = 16  # the first conv's in_channels x kernel area up to which the graph does its im2col


def _first_qdq_conv(model):
    """(conv, q_x, dq_w, weight) of a QDQ graph's first conv when it is fed by the quantised graph
    input (graph input -> Q -> DQ -> Conv) with an int8 initializer weight and no groups; else None."""
    from onnx import numpy_helper

    g = model.graph
    by_out = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    conv = next((n for n in g.node if n.op_type == "Conv"), None)  # the graph's first conv, only
    if conv is None:
        return None
    dq_x, dq_w = by_out.get(conv.input[0]), by_out.get(conv.input[1])
    q_x = by_out.get(dq_x.input[0]) if dq_x is not None and dq_x.op_type == "DequantizeLinear" else None
    if (q_x is None or q_x.op_type != "QuantizeLinear" or q_x.input[0] != g.input[0].name or dq_w is None
            or dq_w.op_type != "DequantizeLinear" or dq_w.input[0] not in inits
            or any(a.name == "group" and a.i != 1 for a in conv.attribute)):
        return None  # not fed by the quantised graph input, or grouped
    return conv, q_x, dq_w, numpy_helper.to_array(inits[dq_w.input[0]])


def _set_weight(model, dq_w, w) -> None:
    from onnx import numpy_helper

    t = next(t for t in model.graph.initializer if t.name == dq_w.input[0])
    t.CopyFrom(numpy_helper.from_array(w, dq_w.input[0]))


def _insert_before(model, node, new_nodes, stale) -> None:
    """Insert `new_nodes` ahead of `node`, and drop value_info of the `stale` (reshaped) tensors."""
    g = model.graph
    at = list(g.node).index(node)
    for k, n in enumerate(new_nodes):
        g.node.insert(at + k, n)
    keep = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(keep)


def pad_first_conv_channels(model, to: int = PAD_CHANNELS_TO) -> str | None:
    """Pad the input channels of a QDQ graph's first conv (graph input -> Q -> DQ -> Conv, with an
    int8 initializer weight) up to a multiple of `to`; returns what it did, or None if the graph
    has no such conv or it already has enough channels.

    The padding is exact: a Pad node fills the new float channels with 0.0, which quantises to the
    input zero point, and their weights are 0, so every int32 sum of the conv is the one it was
    (onnxruntime computes (x - x_zp) * (w - w_zp)). With one input channel the im2col GEMM has
    K = 9, below the 4-byte groups of the int8 kernels; at K = 36 onnxruntime's QLinearConv took
    0.54 ms less of the encoder's 7.2 ms (batch 64, 1 thread, Zen 4 VNNI, same output bits)."""
    from onnx import helper, numpy_helper

    found = _first_qdq_conv(model)
    if found is None:
        return None
    conv, q_x, dq_w, w = found
    c = w.shape[1]
    if c % to == 0:
        return None
    new = -(-c // to) * to
    wp = np.zeros((w.shape[0], new, *w.shape[2:]), w.dtype)
    wp[:, :c] = w
    _set_weight(model, dq_w, wp)
    pads = np.zeros(2 * w.ndim, np.int64)
    pads[w.ndim + 1] = new - c  # after the existing channels
    model.graph.initializer.append(numpy_helper.from_array(pads, "first_conv_channel_pads"))
    pad = helper.make_node("Pad", [q_x.input[0], "first_conv_channel_pads"], ["input_channels_padded"], mode="constant")
    q_x.input[0] = "input_channels_padded"
    _insert_before(model, q_x, [pad], _reshaped(q_x, conv, dq_w))
    return f"first conv input channels padded {c} -> {new} with zero weights (exact)"


def _reshaped(q_x, conv, dq_w) -> set[str]:
    """The tensors a rewrite of the first conv's input channels reshapes (their value_info is stale)."""
    return {q_x.output[0], conv.input[0], dq_w.input[0], dq_w.output[0]}


def im2col_kernels(c: int, kh: int, kw: int) -> np.ndarray:
    """The one-hot kernels (c * kh * kw, c, kh, kw) of an im2col as a conv: output channel
    (dy * kw + dx) * c + ci copies input channel ci at offset (dy, dx). A weight (out, c, kh, kw)
    laid out the same way, ``w.transpose(0, 2, 3, 1).reshape(out, -1)``, is its 1x1 conv."""
    k = c * kh * kw
    onehot = np.zeros((k, c, kh, kw), np.float32)
    dy, dx, ci = np.meshgrid(np.arange(kh), np.arange(kw), np.arange(c), indexing="ij")
    onehot[((dy * kw + dx) * c + ci).ravel(), ci.ravel(), dy.ravel(), dx.ravel()] = 1.0
    return onehot


def im2col_first_conv(model, max_k: int = IM2COL_MAX_K, to: int = PAD_CHANNELS_TO) -> str | None:
    """Turn a QDQ graph's first conv (as :func:`pad_first_conv_channels` finds it) into a 1x1
    conv over its own im2col, built in the graph before the input is quantised by a float Conv
    with one-hot kernels: one output channel per kernel offset (dy, dx) and input channel, which
    copies the pixel that offset reads (the original conv's pads, strides and dilations), plus
    all-zero kernels up to a multiple of `to` channels. The 1x1 conv's weights are the kernel's,
    laid out the same way ((dy, dx), then input channel), zero for the filled channels. Returns
    what it did, or None where it does not apply: no such conv, a 1x1 kernel, in_channels x
    kernel area above `max_k` (the copies would cost more than they save), or auto_pad.

    Exact: a one-hot kernel's sum is the pixel itself (x * 1 plus products with 0), the padded
    pixels and filled channels are 0.0, which quantises to the input zero point the conv's own
    padding uses, so each output is the same sum of the same int32 products (x - x_zp) * (w -
    w_zp). Why: with one input channel a 3x3 conv is a K = 9 GEMM per output pixel; padded to 4
    channels it is K = 36 (27 of them zero), and onnxruntime's QLinearConv spends most of its time
    on those products. As a 1x1 conv over 12 channels it does a third of them; the float copy is a
    small conv (12 outputs of K = 9) that onnxruntime runs in its NCHWc kernels."""
    from onnx import helper, numpy_helper

    found = _first_qdq_conv(model)
    if found is None:
        return None
    conv, q_x, dq_w, w = found
    if w.ndim != 4:
        return None
    o, c, kh, kw = w.shape
    k = c * kh * kw
    if k > max_k or (kh, kw) == (1, 1) or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET")
                                              for a in conv.attribute):
        return None
    kp = -(-k // to) * to
    onehot = np.zeros((kp, c, kh, kw), np.float32)
    onehot[:k] = im2col_kernels(c, kh, kw)
    model.graph.initializer.append(numpy_helper.from_array(onehot, "im2col_onehot"))
    copy = helper.make_node("Conv", [q_x.input[0], "im2col_onehot"], ["im2col"], kernel_shape=[kh, kw],
                            **{a.name: list(a.ints) for a in conv.attribute if a.name in ("pads", "strides", "dilations")})
    q_x.input[0] = "im2col"
    w1 = np.zeros((o, kp, 1, 1), w.dtype)
    w1[:, :k, 0, 0] = w.transpose(0, 2, 3, 1).reshape(o, k)  # channel (dy * kw + dx) * c + input channel
    _set_weight(model, dq_w, w1)
    stale = _reshaped(q_x, conv, dq_w)
    for a in list(conv.attribute):
        if a.name in ("pads", "strides", "dilations"):
            conv.attribute.remove(a)
        elif a.name == "kernel_shape":
            a.ints[:] = [1, 1]
    _insert_before(model, q_x, [copy], stale)
    return (f"first conv ({c} input channel{'s' * (c > 1)}, {kh}x{kw}) as a 1x1 conv over its im2col (a one-hot "
            f"float conv before the input is quantised), {k} -> {kp} channels with zero weights (exact)")


def pixel_copy_convs(model) -> int:
    """How many Conv nodes of `model` only copy pixels (as :func:`im2col_first_conv` writes them):
    an initializer weight of 0s and 1s with at most one 1 per output channel, and no bias. They
    run as float convs, but multiply by nothing but 0 and 1."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    n = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) > 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype.kind == "f" and np.isin(w, (0.0, 1.0)).all() and (w.reshape(len(w), -1).sum(1) <= 1).all():
            n += 1
    return n


def _spec(value_info, grid: dict | None, dynamic_batch: bool) -> dict[str, Any]:
    t = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if dynamic_batch:
        dims[0] = None
    return {"name": value_info.name, "shape": dims, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)),
            "quant": grid}


def op_counts(model) -> dict[str, int]:
    """Node counts by op type ("domain:Op" outside the default domain), sorted by name."""
    c = collections.Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                            for n in model.graph.node)
    return dict(sorted(c.items()))


def io_quant(model) -> tuple[dict | None, dict | None]:
    """Grids of a QDQ graph's boundary: the QuantizeLinear fed by the graph input and the
    DequantizeLinear producing the graph output, as {"scale", "zero_point"} (None if absent)."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:  # Constant nodes hold scalars in some exporter versions
        if n.op_type == "Constant" and n.attribute:
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def grid(node) -> dict | None:
        scale, zp = (consts.get(name) for name in node.input[1:3])
        if scale is None or zp is None or np.size(scale) != 1:
            return None
        return {"scale": float(np.asarray(scale).item()), "zero_point": int(np.asarray(zp).item())}

    inp, out = model.graph.input[0].name, model.graph.output[0].name
    in_q = next((grid(n) for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == inp), None)
    out_q = next((grid(n) for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == out), None)
    return in_q, out_q


def check_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """onnx.checker with full_check (shape inference included); {"ok": True} or the error text."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        return {"ok": True}
    except Exception as e:  # checker raises ValidationError / InferenceError
        return {"ok": False, "error": str(e).splitlines()[0][:300]}


def ort_session(path: str | os.PathLike | bytes, *, threads: int | None = 1, level: str = "all",
                optimized_path: str | os.PathLike | None = None):
    """An onnxruntime CPU session with the settings qdefend uses (see the module docstring), for a
    model file or a serialized model (bytes)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3  # the ENABLE_ALL "hardware specific optimized model" notice
    for k, v in ORT_SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def ort_op_counts(path: str | os.PathLike, *, level: str = "all") -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (its optimised model, CPU provider).

    At "all" (what the runtime uses) int8 convs appear as com.microsoft:QLinearConv (NHWC); a
    float Conv or a DequantizeLinear feeding one means a conv was left unfused (float).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        ort_session(path, level=level, optimized_path=opt)
        return op_counts(onnx.load(str(opt)))
