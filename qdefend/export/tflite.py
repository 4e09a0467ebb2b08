"""TFLite (LiteRT) export of an int8 pt2e graph, fully int8 from input to output.

``litert_torch.convert(converted, args, quant_config=QuantConfig(pt2e_quantizer=q))`` lowers a
``quant.convert(prepared, fold_quantize=False)`` graph (with folded int8 constants the stablehlo
lowering fails) to a .tflite whose every conv, pool and Sigmoid runs on int8 tensors, with int8
input and output. litert-torch 0.10.0 reads nothing from the quantizer but
``global_config.is_dynamic`` (False selects its STATIC QDQ conversion): the quantization itself
is already in the graph, made by qdefend's own XNNPACK-style quantizer during QAT/PTQ. So a
litert ``PT2EQuantizer`` with a static per-channel config is handed over as that flag; our
quantizer (no ``global_config``) is refused by ``QuantConfig``.

With ``dynamic_batch`` the batch dimension is dynamic in the whole file: every batch-dependent
tensor (input, intermediates, output) is stored as shape ``[1, ...]`` with shape_signature
``[-1, ...]``, so an interpreter can ``resize_tensor_input`` to any batch, and a runtime that
cannot resize (LiteRT.js, which reads the stored shapes) sees one consistent batch-1 graph.
litert-torch 0.10.0 alone does not get there: given ``dynamic_shapes`` it makes only the input
(and its layout TRANSPOSE) dynamic, then its convolution lowering builds the result type from the
example's concrete batch (``RankedTensorType.get(out_aval.shape)`` on a SymInt gives its hint), so
every tensor from the first conv on keeps the example batch (``[2, 8, 7, 7]`` for a batch-2
example); and its jax-bridged lowerings (the conv bias add) reject dynamic dims outright. So after
conversion :func:`_make_batch_dynamic` rewrites the stored shapes, with the batch-dependent
tensors found by asking the TFLite kernels themselves (allocate at two batches, see which
tensors follow). Kernels recompute every shape at allocate_tensors, so the ops, weights and int8
outputs are exactly those litert wrote; only the shape metadata changes.

Then :func:`im2col_first_conv` makes the first conv (one input channel: litert writes a
DEPTHWISE_CONV_2D with depth multiplier = out channels) a 1x1 CONV_2D over its im2col, as the
ONNX exporter does (``qdefend.export.onnx.im2col_first_conv``), here with an int8 one-hot conv.
"""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qdefend import quant
from qdefend.errors import QdefendError

from .onnx import IM2COL_MAX_K, _batch_example, graph_kind, im2col_kernels

__all__ = ["CONV_OPS", "export_tflite", "im2col_first_conv", "tflite_report"]

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


@contextlib.contextmanager
def _quiet_litert():
    """litert-torch prints a line per conversion stage unless LITERT_TORCH_SHOW_PROGRESS=n."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    old = os.environ.get(key)
    os.environ.setdefault(key, "n")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)


def _static_quant_config():
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig

    q = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    return QuantConfig(pt2e_quantizer=q)


def _has_folded_weights(gm: nn.Module) -> bool:
    """True for a graph converted with fold_quantize=True (int8 constants feeding dequantize)."""
    return any(n.op == "get_attr" and getattr(getattr(gm, str(n.target), None), "dtype", None) == torch.int8
               for n in gm.graph.nodes)


def export_tflite(prepared_or_float: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                  int8: bool = True, dynamic_batch: bool = True, im2col: bool = True) -> dict[str, Any]:
    """Write a .tflite of a QAT/PTQ-prepared graph, an int8 graph converted with
    fold_quantize=False, or (int8=False) a float module; returns :func:`tflite_report`, with
    "rewrites" (what :func:`im2col_first_conv` did, when `im2col` and it applies).

    A prepared graph is converted here (a copy; the argument is left as it is).
    """
    import litert_torch

    kind = graph_kind(prepared_or_float)
    if int8 and kind == "float":
        raise QdefendError("export_tflite(int8=True) needs a QAT/PTQ-prepared or converted int8 graph; "
                           "pass int8=False for a float .tflite, or prepare with qdefend.quant.prepare_ptq")
    if not int8 and kind != "float":
        raise QdefendError("export_tflite(int8=False) needs a float module; use int8=True for a quantized graph")
    module = prepared_or_float
    if kind == "prepared":
        module = quant.convert(prepared_or_float, fold_quantize=False)
    elif kind == "converted" and _has_folded_weights(module):
        raise QdefendError("this int8 graph was converted with fold_quantize=True, which LiteRT cannot "
                           "lower: use qdefend.quant.convert(prepared, fold_quantize=False)")
    elif kind == "float":
        module = module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with _quiet_litert(), torch.no_grad():
        x = _batch_example(example) if dynamic_batch else example.detach()
        edge = litert_torch.convert(module, (x,), dynamic_shapes=shapes,
                                    quant_config=_static_quant_config() if int8 else None)
        edge.export(str(path))
    if dynamic_batch:
        _make_batch_dynamic(path)
    rewrites = []
    if int8 and im2col and (note := im2col_first_conv(path)):
        rewrites.append(note)
    return {**tflite_report(path), "rewrites": rewrites}


_PROBE_BATCHES = (3, 5)


def _probe_shapes(path: Path, batch: int) -> dict[int, list[int]]:
    """Every tensor's shape once the kernels have been prepared for `batch` input rows.

    Without the default XNNPACK delegate: the tensors a delegate takes over keep their stored
    shape in get_tensor_details(), only the plain kernels report what they computed."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path), num_threads=1,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    (inp,) = it.get_input_details()
    it.resize_tensor_input(inp["index"], [batch, *(int(v) for v in inp["shape"][1:])])
    it.allocate_tensors()
    return {t["index"]: [int(v) for v in t["shape"]] for t in it.get_tensor_details()}


def _make_batch_dynamic(path: Path) -> list[int]:
    """Store every batch-dependent tensor of a dynamic-input .tflite as [1, ...] with
    shape_signature [-1, ...]; the indices rewritten. See the module docstring for why.

    A tensor is batch-dependent when its dim 0 follows the input batch (probed at two batch
    sizes) and its other dims stay as stored. Any other change, or a stored shape the kernels
    do not reproduce, means a batch can't be resized in this graph (e.g. a RESHAPE with a
    constant shape): then this raises rather than write a file whose shapes lie."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    hint = "export with dynamic_batch=False (a fixed batch) instead"
    try:
        probes = [_probe_shapes(path, b) for b in _PROBE_BATCHES]
    except (RuntimeError, ValueError) as e:
        raise QdefendError(f"{path.name}: the converted graph cannot be resized to another batch "
                           f"({e}); {hint}") from e
    model = fbu.read_model(str(path))
    if len(model.subgraphs) != 1:
        raise QdefendError(f"{path.name} has {len(model.subgraphs)} subgraphs; a dynamic batch is "
                           f"only rewritten for a single-subgraph model: {hint}")
    changed = []
    for k, t in enumerate(model.subgraphs[0].tensors):
        stored = [int(v) for v in t.shape] if t.shape is not None else []
        got = [p[k] for p in probes]
        if got[0] == got[1]:
            if got[0] != stored:
                raise QdefendError(f"{path.name}: tensor {k} is stored as {stored} but its kernel "
                                   f"computes {got[0]}; {hint}")
            continue
        if not stored or any(g != [b, *stored[1:]] for g, b in zip(got, _PROBE_BATCHES)):
            raise QdefendError(f"{path.name}: tensor {k} ({stored}) changes beyond its batch dim "
                               f"when the input batch does ({got}); {hint}")
        sig = [int(v) for v in t.shapeSignature] if t.shapeSignature is not None and len(t.shapeSignature) \
            else stored
        t.shape, t.shapeSignature = [1, *stored[1:]], [-1, *sig[1:]]
        changed.append(k)
    fbu.write_model(model, str(path))
    return changed


def _opcode(model, code: int) -> int:
    """The index of builtin operator `code` in the model's operator codes (added if missing)."""
    from ai_edge_litert import schema_py_generated as fb

    for i, c in enumerate(model.operatorCodes):
        if max(c.builtinCode, c.deprecatedBuiltinCode) == code:
            return i
    c = fb.OperatorCodeT()
    c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 3  # 3: per-channel int8
    model.operatorCodes.append(c)
    return len(model.operatorCodes) - 1


def _add_tensor(model, name: str, shape, signature, ttype: int, data: np.ndarray | None,
                scale, zero_point, axis: int = 0) -> int:
    """Append a quantised tensor (a constant when `data` is given) to the first subgraph."""
    from ai_edge_litert import schema_py_generated as fb

    sg = model.subgraphs[0]
    t = fb.TensorT()
    t.name, t.type, t.buffer = name.encode(), ttype, 0
    t.shape = np.asarray(shape, np.int32)
    if signature is not None:
        t.shapeSignature = np.asarray(signature, np.int32)
    if data is not None:
        b = fb.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8).copy()
        model.buffers.append(b)
        t.buffer = len(model.buffers) - 1
    q = fb.QuantizationParametersT()
    q.scale, q.zeroPoint = np.asarray(scale, np.float32), np.asarray(zero_point, np.int64)
    q.quantizedDimension = axis
    t.quantization = q
    sg.tensors.append(t)
    return len(sg.tensors) - 1


def im2col_first_conv(path: str | os.PathLike, max_k: int = IM2COL_MAX_K) -> str | None:
    """Rewrite an int8 .tflite in place: its first conv with few inputs per output pixel (a
    DEPTHWISE_CONV_2D over one input channel, as litert writes a 1-channel conv, or a CONV_2D with
    in_channels x kernel area <= `max_k`) becomes an int8 CONV_2D with one-hot kernels that
    copies the pixels each output reads into in_channels x kernel area channels (the original
    padding, strides and dilations), then a 1x1 CONV_2D with the original weights laid out the same
    way ((dy, dx), then input channel), its bias, output quantisation and fused activation.
    Returns what it did, or None where it does not apply.

    Exact: the copy's weights are 127 at scale 1/127 and its output has the input's scale and
    zero point, so each copied value is (x - zp) * 127 * (1/127) + zp, which rounds back to x
    (|x - zp| <= 255, the rescale is within 1e-7 of 1), and its padding is the input zero point,
    as the original conv's; the 1x1 conv then sums the same int32 products. Why: XNNPACK runs a
    3x3 conv over one channel as an indirect GEMM whose 9 taps each take a whole group of input
    bytes, so the first conv (3% of the encoder's MACs) took 23% of its time; a 1x1 conv is a
    plain GEMM."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model(str(path))
    sg = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    B = fb.BuiltinOperator
    at = next((k for k, op in enumerate(sg.operators) if codes[op.opcodeIndex] in (B.CONV_2D, B.DEPTHWISE_CONV_2D)), None)
    if at is None:
        return None
    op = sg.operators[at]
    depthwise = codes[op.opcodeIndex] == B.DEPTHWISE_CONV_2D
    x_i, w_i, b_i = (int(i) for i in op.inputs)
    X, W, Y = sg.tensors[x_i], sg.tensors[w_i], sg.tensors[int(op.outputs[0])]
    data = model.buffers[W.buffer].data if W.buffer else None
    if (X.type != fb.TensorType.INT8 or W.type != fb.TensorType.INT8 or data is None or b_i < 0
            or X.quantization is None or len(X.quantization.scale) != 1 or W.name == b"im2col_onehot"):
        return None  # not an int8 conv with constant weights and a bias, or rewritten already
    if depthwise:  # weights [1, kh, kw, out]: a full conv only over one input channel
        _, kh, kw, out = (int(v) for v in W.shape)
        c = int(X.shape[3])
        w = np.frombuffer(bytes(data), np.int8).reshape(kh, kw, out).transpose(2, 0, 1)[..., None]
        if c != 1:
            return None
    else:  # weights [out, kh, kw, in]
        out, kh, kw, c = (int(v) for v in W.shape)
        w = np.frombuffer(bytes(data), np.int8).reshape(out, kh, kw, c)
    k = c * kh * kw
    if k > max_k or (kh, kw) == (1, 1) or any(int(v) != 0 for v in W.quantization.zeroPoint):
        return None
    opt = op.builtinOptions
    onehot = (127 * im2col_kernels(c, kh, kw).transpose(0, 2, 3, 1)).astype(np.int8)  # [out, kh, kw, in]
    s_x, zp_x = float(X.quantization.scale[0]), int(X.quantization.zeroPoint[0])
    shape = [*(int(v) for v in Y.shape[:3]), k]
    sig = None if Y.shapeSignature is None or not len(Y.shapeSignature) else [*(int(v) for v in Y.shapeSignature[:3]), k]
    w_copy = _add_tensor(model, "im2col_onehot", onehot.shape, None, fb.TensorType.INT8, onehot, [1 / 127] * k, [0] * k)
    b_copy = _add_tensor(model, "im2col_onehot_bias", [k], None, fb.TensorType.INT32, np.zeros(k, np.int32),
                         [s_x / 127] * k, [0] * k)
    col = _add_tensor(model, "im2col", shape, sig, fb.TensorType.INT8, None, [s_x], [zp_x])
    scale = np.broadcast_to(np.asarray(W.quantization.scale, np.float32), (out,))
    w1 = _add_tensor(model, "im2col_conv_weights", [out, 1, 1, k], None, fb.TensorType.INT8,
                     w.reshape(out, k), scale, [0] * out)

    def conv(inputs, outputs, padding, strides, dilations, act) -> Any:
        o = fb.OperatorT()
        o.opcodeIndex, o.builtinOptionsType = _opcode(model, B.CONV_2D), fb.BuiltinOptions.Conv2DOptions
        c2 = fb.Conv2DOptionsT()
        c2.padding, (c2.strideH, c2.strideW), (c2.dilationHFactor, c2.dilationWFactor) = padding, strides, dilations
        c2.fusedActivationFunction = act
        o.builtinOptions, o.inputs, o.outputs = c2, np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
        return o

    copy = conv([x_i, w_copy, b_copy], [col], opt.padding, (opt.strideH, opt.strideW),
                (opt.dilationHFactor, opt.dilationWFactor), fb.ActivationFunctionType.NONE)
    gemm = conv([col, w1, b_i], [int(op.outputs[0])], fb.Padding.VALID, (1, 1), (1, 1), opt.fusedActivationFunction)
    sg.operators[at:at + 1] = [copy, gemm]
    if not any(w_i in o.inputs for o in sg.operators):  # the old weights, now unused
        model.buffers[W.buffer].data = None
    fbu.write_model(model, str(path))
    return (f"first conv ({c} input channel{'s' * (c > 1)}, {kh}x{kw}) as a 1x1 conv over its im2col "
            f"(an int8 one-hot conv, {k} channels) (exact)")


def _interpreter(path: str | os.PathLike):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=1)


def _spec(d: dict) -> dict[str, Any]:
    scale, zp = d["quantization"]
    shape = [int(v) for v in d["shape_signature"]]
    return {"name": d["name"], "shape": [None if v < 0 else v for v in shape],
            "dtype": np.dtype(d["dtype"]).name,
            "quant": {"scale": float(scale), "zero_point": int(zp)} if scale else None}


def tflite_report(path: str | os.PathLike) -> dict[str, Any]:
    """What a .tflite holds: op counts, every conv's tensor dtypes, and its input/output specs.

    "int8_convs" is True when every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED takes int8
    activations and int8 weights and gives int8 outputs (bias int32), as XNNPACK runs them.
    Shapes are the file's shape_signature (None for a dynamic dim).
    """
    it = _interpreter(path)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()  # public API has no op list; stable across ai-edge-litert 1.x/2.x

    def dtypes(idx) -> list[str]:
        return [np.dtype(tensors[i]["dtype"]).name for i in idx if i >= 0]

    convs = [{"op": o["op_name"], "inputs": dtypes(o["inputs"]), "outputs": dtypes(o["outputs"])}
             for o in ops if o["op_name"] in CONV_OPS]
    int8_convs = bool(convs) and all(
        c["inputs"][:2] == ["int8", "int8"] and all(t == "int32" for t in c["inputs"][2:])
        and c["outputs"] == ["int8"] for c in convs)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    in_spec, out_spec = _spec(inp), _spec(out)
    return {
        "op_counts": dict(sorted(collections.Counter(o["op_name"] for o in ops).items())),
        "tensor_dtypes": dict(sorted(collections.Counter(np.dtype(t["dtype"]).name
                                                          for t in tensors.values()).items())),
        "convs": convs,
        "int8_convs": int8_convs,
        "input": in_spec,
        "output": out_spec,
    }
