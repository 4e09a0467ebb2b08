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

from .onnx import _batch_example, graph_kind

__all__ = ["CONV_OPS", "export_tflite", "tflite_report"]

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
                  int8: bool = True, dynamic_batch: bool = True) -> dict[str, Any]:
    """Write a .tflite of a QAT/PTQ-prepared graph, an int8 graph converted with
    fold_quantize=False, or (int8=False) a float module; returns :func:`tflite_report`.

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
    return tflite_report(path)


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
