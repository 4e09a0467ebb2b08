"""Int8 quantization-aware training (QAT) and post-training calibration for edge encoders.

Why pt2e: torchao's `QATConfig`/`quantize_` only swaps Linear/Embedding, and torch.ao eager QAT is
deprecated, so conv nets go through `torchao.quantization.pt2e`: torch.export the float module with a
dynamic batch dim, insert fake-quant modules (`prepare_qat_pt2e`), train, then `convert_pt2e` to a
graph of real int8 weights plus quantize/dequantize ops that the ONNX and LiteRT exporters transcribe.

One scheme is used for training and for every export (so the released features are the ones trained
with): symmetric per-channel int8 weights in [-127, 127], asymmetric per-tensor int8 activations, and
TFLite's fixed output grid for Sigmoid/Softmax (scale 1/256, zero point -128) so LiteRT keeps the
encoder fully int8 up to its output. The annotators are torchao's XNNPACK ones (node-walk, handle
conv-BN(-ReLU) folding in QAT, depthwise, residual add(-ReLU), shared-range max-pool/flatten); the
fixed-grid Sigmoid annotator is added here. litert-torch's own `PT2EQuantizer(is_qat=True)` is not
used: in 0.10.0 its conv-BN pattern fails ("Expected `mod` to be an instance of `torch.nn.Module`,
got <class 'function'>"), it leaves residual add-ReLU float, and importing it pulls in jax.

Typical use::

    gm = prepare_qat(encoder, x[:2])           # a copy, in train mode; encoder is untouched
    ...train gm like any module (outer.train() / outer.eval() switch BN and observers)...
    save_file(qat_state_dict(gm), "ckpt.safetensors")
    gm2 = prepare_qat(FreshEncoder(), x[:2]); load_qat_state_dict(gm2, load_file("ckpt.safetensors"))
    int8 = convert(gm)                         # for ONNX; convert(gm, fold_quantize=False) for LiteRT
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # silences CUDA .so warnings

import copy
import math
import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .checks import check_choice, check_number
from .edge.release import WIRE_BITS, WIRE_GRANULARITIES, WIRE_ORDERS, code_range, grid_params
from .errors import QdefendError

__all__ = [
    "SCHEMES",
    "ACT_SCALES",
    "learned_scale_fake_quantize",
    "QuantConfig",
    "WireQuantizer",
    "QATGraphModule",
    "make_quantizer",
    "prepare_qat",
    "prepare_ptq",
    "calibrate",
    "set_train",
    "freeze_observers",
    "convert",
    "qat_state_dict",
    "load_qat_state_dict",
    "int8_weight_report",
]

SCHEMES = ("int8", "none")
ACT_SCALES = ("observed", "learned")
SIGMOID_SCALE, SIGMOID_ZERO_POINT = 1.0 / 256.0, -128  # TFLite's int8 Logistic/Softmax output grid
_FROZEN_ATTR = "_qdefend_observers_frozen"


@dataclass
class QuantConfig:
    """How the edge encoder (and optionally the cloud head) is quantized during training.

    scheme: "int8" trains with fake quantization (QAT) so exported int8 artifacts match training;
    "none" trains in float. quantize_head: also fake-quantize the cloud head (it usually stays float).

    The wire (what the device sends): ``wire_bits`` per released feature (8, or 2..7 bit-packed),
    one grid per tensor or per channel (``wire_granularity``), and ``wire_order``: release_then_wire
    quantises the released (noisy) features, wire_then_release quantises the encoder's output, runs
    the release steps and puts the result back on the same grid. Anything but the default (8 bits,
    per tensor, release_then_wire) trains with that wire fake-quantized at the cut
    (:class:`WireQuantizer`), and the export writes the trained grid into the manifest.

    act_scales: "observed" (moving-average min/max) or "learned" (LSQ step sizes after an observed
    warm-up of ``act_warmup`` training steps; :func:`learned_scale_fake_quantize`).
    """

    scheme: str = "int8"
    quantize_head: bool = False
    act_scales: str = "observed"  # observed | learned
    act_warmup: int = 100
    wire_bits: int = 8
    wire_granularity: str = "tensor"  # tensor | channel
    wire_order: str = "release_then_wire"  # release_then_wire | wire_then_release

    def __post_init__(self) -> None:
        check_choice(self.scheme, "quant.scheme", SCHEMES, fix="--qat int8")
        if isinstance(self.wire_bits, bool) or self.wire_bits not in WIRE_BITS:
            raise QdefendError(f"quant.wire_bits must be one of {', '.join(map(str, WIRE_BITS))}, got "
                               f"{self.wire_bits!r}: e.g. --wire-bits 4")
        check_choice(self.wire_granularity, "quant.wire_granularity", WIRE_GRANULARITIES,
                     fix="--wire-granularity channel")
        check_choice(self.wire_order, "quant.wire_order", WIRE_ORDERS, fix="--wire-order wire_then_release")
        check_choice(self.act_scales, "quant.act_scales", ACT_SCALES, fix="--set quant.act_scales=learned")
        self.act_warmup = check_number(self.act_warmup, "quant.act_warmup (training steps)", lo=1, integer=True,
                                       fix="--set quant.act_warmup=100")
        if self.scheme == "none" and self.act_scales != "observed":
            raise QdefendError("quant.act_scales=learned needs fake quantization: train with --qat int8")
        if self.scheme == "none" and self.quantize_head:
            raise QdefendError(
                "quantize_head=True needs scheme='int8'; use QuantConfig(scheme='int8', "
                "quantize_head=True) or QuantConfig(scheme='none', quantize_head=False)."
            )

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    @property
    def custom_wire(self) -> bool:
        """Whether the wire differs from the default (and so is trained with a WireQuantizer)."""
        return (self.wire_bits, self.wire_granularity, self.wire_order) != (8, "tensor", "release_then_wire")


# --------------------------------------------------------------------------------------------
# The wire at the cut


class WireQuantizer(nn.Module):
    """Fake quantization of the released features onto the wire's grid, during training and in
    every torch evaluation, so the head learns from what a device will send.

    The grid's range is observed like pt2e's activations (moving-average min/max, averaging
    constant 0.01, the first batch's min/max to start), per tensor or per channel (dim 1), and
    turned into a `bits`-bit asymmetric grid that holds 0 (:func:`qdefend.edge.release.grid_params`,
    the same function the manifest's grid comes from). Observation happens in train mode only and
    only where ``observe`` (wire_then_release quantises twice: the encoder's output, observed, then
    the released features on the same grid). Gradients pass straight through inside the range
    (torch's fake_quantize ops). Its buffers are named like an observer's (min_val, max_val) so a
    distributed run reduces them with MIN/MAX, which is exact for this update rule.
    """

    AVERAGING = 0.01

    def __init__(self, bits: int, granularity: str, order: str, channels: int):
        super().__init__()
        self.bits, self.granularity, self.order = int(bits), granularity, order
        n = channels if granularity == "channel" else 1
        self.register_buffer("min_val", torch.full((n,), float("inf")))
        self.register_buffer("max_val", torch.full((n,), float("-inf")))

    @property
    def observed(self) -> bool:
        return bool(torch.isfinite(self.min_val).all() and torch.isfinite(self.max_val).all())

    @torch.no_grad()
    def _observe(self, z: torch.Tensor) -> None:
        if self.granularity == "channel":
            flat = z.detach().transpose(0, 1).reshape(z.shape[1], -1).float()
            lo, hi = flat.amin(1), flat.amax(1)
        else:
            lo, hi = z.detach().float().amin().reshape(1), z.detach().float().amax().reshape(1)
        fresh = ~torch.isfinite(self.min_val)
        c = self.AVERAGING
        self.min_val.copy_(torch.where(fresh, lo, self.min_val + c * (lo - self.min_val)))
        self.max_val.copy_(torch.where(fresh, hi, self.max_val + c * (hi - self.max_val)))

    def grid(self) -> dict:
        """The manifest's ``features.wire`` for the observed range."""
        if not self.observed:
            raise QdefendError("the wire's range was never observed (no training step ran): train the run "
                               "for at least one step before exporting it")
        grids = [grid_params(lo, hi, self.bits) for lo, hi in zip(self.min_val.tolist(), self.max_val.tolist())]
        out = {"dtype": "int8", "bits": self.bits, "granularity": self.granularity, "order": self.order}
        if self.granularity == "channel":
            return {**out, "scale": [g["scale"] for g in grids], "zero_point": [g["zero_point"] for g in grids]}
        return {**out, "scale": grids[0]["scale"], "zero_point": grids[0]["zero_point"]}

    def forward(self, z: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if self.training and observe:
            self._observe(z)
        if not self.observed:  # an untrained wire (before the first step) passes features through
            return z
        g = self.grid()
        qmin, qmax = code_range(self.bits)
        if self.granularity == "channel":
            scale = torch.tensor(g["scale"], dtype=torch.float32, device=z.device)
            zp = torch.tensor(g["zero_point"], dtype=torch.int32, device=z.device)
            return torch.fake_quantize_per_channel_affine(z.float(), scale, zp, 1, qmin, qmax).to(z.dtype)
        return torch.fake_quantize_per_tensor_affine(z.float(), float(g["scale"]), int(g["zero_point"]),
                                                     qmin, qmax).to(z.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.granularity}, order={self.order}"


# --------------------------------------------------------------------------------------------
# Activation fake-quant: torch's rounding step, without its CPU cost


class _FakeQuantPerTensor(torch.autograd.Function):
    """Per-tensor fake quantization with a straight-through gradient inside the grid, bit-identical
    to ``torch.fake_quantize_per_tensor_affine`` (tested) but written as a few vectorised passes.

    On CPU torch's cachemask kernel is a scalar loop (about 60 ms for a 128x64x28x28 activation on
    one Zen 4 core); x * (1/scale), round half to even, clamp, * scale in float32 gives the same bits
    (the integer codes are exact in float32, and one rounding of (q - zp) * scale is the kernel's
    double product rounded once). The grid values are read on the host, so other devices keep
    torch's own kernel.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int):
        s = scale.reshape(()).float()
        inv = float(1.0 / s)  # float32 1/scale, as the kernel computes it
        zp = int(zero_point.reshape(()))
        lo, hi = float(qmin - zp), float(qmax - zp)
        t = x * inv
        t.round_()
        out = t.clamp(lo, hi)
        ctx.save_for_backward(out == t)  # inside the grid
        return out.mul_(float(s))

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def fake_quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             qmin: int, qmax: int) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine`` with tensor qparams: the same bits and gradient,
    faster on CPU (see :class:`_FakeQuantPerTensor`)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return _FakeQuantPerTensor.apply(x, scale, zero_point, qmin, qmax)


class _ChannelDiv(torch.autograd.Function):
    """``x / s`` for the per-channel ``s`` of pt2e's QAT conv-BN pattern (conv with the BN-scaled
    weight, divided back by the BN scale before batch norm), with a backward of three passes over
    ``x`` instead of autograd's five: d/ds = -sum(g / s * out) over the broadcast dims. The forward is
    the same op; the gradients are equal up to float rounding (tested)."""

    @staticmethod
    def forward(ctx, x, s):
        out = x / s
        ctx.save_for_backward(out, s)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, s = ctx.saved_tensors
        gx = grad / s
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (gx * out).sum_to_size(s.shape).neg_()
        return gx, gs


def channel_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The conv-BN pattern's division in a prepared QAT graph (see :class:`_ChannelDiv`)."""
    return _ChannelDiv.apply(x, s)


_CONV_TARGETS = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv_transpose1d.input",
                 "aten.conv_transpose2d.input")


def _swap_conv_bn_div(gm: torch.fx.GraphModule, fast: bool) -> torch.fx.GraphModule:
    """Point the conv-BN pattern's division nodes (a conv's output divided by a tensor) at
    :func:`channel_div` (``fast``) or back at aten's div, which ``convert_pt2e`` matches to fold
    the BN into the conv; returns ``gm``."""
    div = torch.ops.aten.div.Tensor
    src, dst = (div, channel_div) if fast else (channel_div, div)
    changed = False
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target is src and node.args
                and isinstance(node.args[0], torch.fx.Node) and str(node.args[0].target) in _CONV_TARGETS):
            node.target, changed = dst, True
    if changed:
        gm.recompile()
    return gm


def _storage_order(x: torch.Tensor) -> torch.Tensor:
    """A view of ``x`` whose logical order is its memory order (channels_last -> NHWC), so a
    full reduction reads it without torch first copying it to NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1)
    return x


@functools.cache
def activation_fake_quantize():
    """The activation fake-quant module class of the project's QAT scheme.

    torchao's plain ``FakeQuantize`` with a moving-average min/max observer: per step the observer
    updates its range, the grid is the observer's own ``calculate_qparams`` (the rule
    ``convert_pt2e`` uses for the int8 graph, so training rounds on the artifact's grid), and the
    rounding is :func:`fake_quantize_per_tensor`. torchao's QAT default for activations,
    ``FusedMovingAvgObsFakeQuantize``, does the same in one op, but computes the grid with a second
    implementation of the rule (C++ ``choose_qparams``, not the observer's ``calculate_qparams``
    that convert uses), copies a channels_last activation to NCHW for its min/max, and rounds with
    the scalar CPU kernel: about a third of a QAT step of the reference split on CPU
    (``benchmarks/training.py``). Its buffers and
    state-dict keys are the same, so checkpoints load either way.
    """
    from torchao.quantization.pt2e import FakeQuantize

    class ActivationFakeQuantize(FakeQuantize):
        def forward(self, X: torch.Tensor) -> torch.Tensor:
            if self.is_per_channel:
                return super().forward(X)
            if self.observer_enabled[0] == 1:
                self.activation_post_process(_storage_order(X.detach()))
                scale, zero_point = self.calculate_qparams()
                if self.scale.shape != scale.shape:
                    self.scale.resize_(scale.shape)
                    self.zero_point.resize_(zero_point.shape)
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
            if self.fake_quant_enabled[0] == 1:
                X = fake_quantize_per_tensor(X, self.scale, self.zero_point, self.quant_min, self.quant_max)
            return X

    ActivationFakeQuantize.__qualname__ = ActivationFakeQuantize.__name__
    return ActivationFakeQuantize


class _LearnedScalePerTensor(torch.autograd.Function):
    """Per-tensor fake quantization on a learned grid (LSQ, Esser et al., "Learned Step Size
    Quantization", ICLR 2020): the same rounding as :class:`_FakeQuantPerTensor`, straight-through
    for x inside the grid, and a gradient for the step size s:

        d out / d s = round(x/s) - x/s   inside the grid,   (q_min - zp) or (q_max - zp) outside,

    scaled by ``grad_factor`` (LSQ: 1 / sqrt(N * q_max), N the features of one sample) so that s
    learns at the pace of the weights.
    The zero point stays fixed (the observed one), so the grid is [(q_min - zp) s, (q_max - zp) s]."""

    @staticmethod
    def forward(ctx, x, s, zero_point: int, qmin: int, qmax: int, grad_factor: float):
        lo, hi = float(qmin - zero_point), float(qmax - zero_point)
        t = x / s
        r = torch.round(t)
        c = r.clamp(lo, hi)
        inside = c == r
        ctx.save_for_backward(inside, c - torch.where(inside, t, torch.zeros_like(t)))
        ctx.grad_factor = grad_factor
        return c * s

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        gs = (grad * ds).sum().reshape(1) * ctx.grad_factor
        return grad * inside, gs, None, None, None, None


@functools.cache
def learned_scale_fake_quantize():
    """The activation fake-quant module class with a learned step size (``quant.act_scales =
    "learned"``).

    It starts as :func:`activation_fake_quantize` (the observer sets the grid) and, after
    ``warmup`` forward passes in training with the observer on, switches to LSQ: the step size is
    then the parameter ``learned_scale`` (initialised to the observed scale), trained by the
    optimiser through :class:`_LearnedScalePerTensor`; the zero point stays the observed one. Its
    ``scale`` buffer follows the learned value, and ``calculate_qparams`` returns it, so
    ``convert_pt2e`` writes the learned grid into the int8 artifact. The grid is then a
    quantisation-only parameter: the float twin (fake quantization off) does not have it, which
    gives a divergence between the two (:mod:`qdefend.defenses.divqat`) a direction of its own.
    """
    base = activation_fake_quantize()

    class LearnedScaleFakeQuantize(base):
        def __init__(self, *args, warmup: int = 100, **kwargs):
            super().__init__(*args, **kwargs)
            self.warmup = int(warmup)
            self.learned_scale = nn.Parameter(torch.ones(1))
            self.register_buffer("learning", torch.zeros(1, dtype=torch.uint8))
            self.register_buffer("observed_steps", torch.zeros(1, dtype=torch.long))

        def calculate_qparams(self):
            if self.learning[0] == 1:
                return self.scale.detach().clone(), self.zero_point.detach().clone()
            return super().calculate_qparams()

        def forward(self, X: torch.Tensor) -> torch.Tensor:
            if self.is_per_channel:
                return super().forward(X)
            if self.learning[0] == 0:
                out = super().forward(X)
                if self.observer_enabled[0] == 1 and self.training:
                    self.observed_steps += 1
                    if int(self.observed_steps) >= self.warmup:  # LSQ from the observed grid on
                        self.learned_scale.data.copy_(self.scale.reshape(1))
                        self.learning[0] = 1
                return out
            s = self.learned_scale.abs() + 2 ** -24  # a step size is positive
            self.scale.copy_(s.detach().reshape(self.scale.shape))
            if self.fake_quant_enabled[0] == 0:
                return X
            zp = int(self.zero_point.reshape(()))
            g = 1.0 / math.sqrt(X[0].numel() * self.quant_max)  # LSQ: N = the features of one sample
            return _LearnedScalePerTensor.apply(X, s, zp, self.quant_min, self.quant_max, g)

    LearnedScaleFakeQuantize.__qualname__ = LearnedScaleFakeQuantize.__name__
    return LearnedScaleFakeQuantize


# --------------------------------------------------------------------------------------------
# Quantizer


def _annotate_fixed_qparams(gm: torch.fx.GraphModule, config) -> None:
    """Give Sigmoid/Softmax outputs TFLite's fixed int8 grid (1/256, zp -128); input as usual."""
    from torchao.quantization.pt2e.quantizer import (
        FixedQParamsQuantizationSpec,
        QuantizationAnnotation,
    )

    fixed = FixedQParamsQuantizationSpec(
        dtype=torch.int8, scale=SIGMOID_SCALE, zero_point=SIGMOID_ZERO_POINT,
        quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
    )
    targets = {torch.ops.aten.sigmoid.default, torch.ops.aten.softmax.int,
               torch.ops.aten._softmax.default}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        ann = node.meta.get("quantization_annotation")
        if ann is not None and ann._annotated:
            continue
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={node.args[0]: config.input_activation},
            output_qspec=fixed, _annotated=True,
        )


def make_quantizer(is_qat: bool, act_scales: str = "observed", act_warmup: int = 100):
    """The project's one int8 scheme as a pt2e Quantizer (QAT fake-quant or PTQ observers).

    Weights: int8 symmetric per output channel, [-127, 127]. Activations: int8 asymmetric per
    tensor (moving-average min/max in QAT, histogram in PTQ). Sigmoid/Softmax: fixed 1/256, -128.
    ``act_scales="learned"`` (QAT only): activation step sizes learned after the observer's
    warm-up of ``act_warmup`` steps (:func:`learned_scale_fake_quantize`).
    """
    from torchao.quantization.pt2e.quantizer import Quantizer
    from torchao.testing.pt2e import _xnnpack_quantizer_utils as xu
    from torchao.testing.pt2e._xnnpack_quantizer import get_symmetric_quantization_config

    config = get_symmetric_quantization_config(is_per_channel=True, is_qat=is_qat)
    if is_qat:
        # The default fused weight fake-quant computes symmetric scales as max|w|/127.5 * 255/254,
        # while convert uses the observer's max|w|/127: ~0.4% apart, so ~1/4 of the weights rounded
        # differently in training than in the int8 artifact. A plain FakeQuantize shares one rule.
        import dataclasses

        from torchao.quantization.pt2e import (
            FakeQuantize,
            MovingAverageMinMaxObserver,
            MovingAveragePerChannelMinMaxObserver,
        )

        act_cls, extra = ((learned_scale_fake_quantize(), {"warmup": act_warmup}) if act_scales == "learned"
                          else (activation_fake_quantize(), {}))
        act = act_cls.with_args(observer=MovingAverageMinMaxObserver, eps=2**-12, **extra)
        config = dataclasses.replace(
            config,
            weight=dataclasses.replace(config.weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(
                observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12)),
            input_activation=dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=act),
            output_activation=dataclasses.replace(config.output_activation, observer_or_fake_quant_ctr=act),
        )
    ops = (("conv_bn_relu", "conv_bn") if is_qat else ()) + (
        "linear_relu", "linear", "conv_relu", "conv", "adaptive_avg_pool2d",
        "add_relu", "add", "mul_relu", "mul", "cat",
    )

    class Int8Quantizer(Quantizer):
        """XNNPACK annotators + TFLite fixed-grid Sigmoid; see the module docstring."""

        def transform_for_annotation(self, model):
            return xu._convert_scalars_to_attrs(model)

        def annotate(self, model):
            for op in ops:
                xu.OP_TO_ANNOTATOR[op](model, config, None)
            _annotate_fixed_qparams(model, config)
            xu.propagate_annotation(model)
            return model

        def validate(self, model):
            pass

    q = Int8Quantizer()
    q.is_qat, q.config = is_qat, config
    return q


# --------------------------------------------------------------------------------------------
# Faster conv-BN pattern rewriting (torchao 0.18 re-exports ~130 pattern graphs per call)

_PATTERN_CACHE: dict = {}
_CONV_OPS = {  # conv_fn torchao passes to its conv-BN helpers -> the aten op it matches
    "conv1d": "aten.conv1d.default", "conv2d": "aten.conv2d.default",
    "conv_transpose1d": "aten.conv_transpose1d.default", "conv_transpose2d": "aten.conv_transpose2d.input",
}


def _pattern_key(pattern, example_inputs, is_cuda, kwargs):
    def sig(v):
        return (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v

    fn = getattr(pattern, "fn", pattern)  # torchao wraps pattern functions in a WrapperModule
    cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
    key = (type(pattern), fn.__code__, cells, is_cuda, tuple(sig(x) for x in example_inputs),
           tuple(sorted((k, sig(v)) for k, v in kwargs.items())))
    hash(key)  # TypeError for unhashable closures: those are not cached
    return key


def _install_pattern_cache() -> None:
    """Make torchao's pattern rewrites fast: QAT conv-BN fuse (prepare), fold (convert), and the
    BN/dropout train<->eval swaps done on every ``.train()``/``.eval()`` of a prepared graph.

    Each builds its pattern variants (conv1d/2d/transpose x per-channel x bias x BN mode) by
    torch.export-ing a tiny function, ~0.5 s each: ~60 s per convert and ~3 s per train/eval
    switch on 2 cores. The graphs depend
    only on the pattern code, its closure flags and the example shapes, so they are exported once
    per process and deep-copied on reuse; variants for conv kinds absent from the model are skipped.
    The rewriting itself is torchao's, unchanged.
    """
    from torchao.quantization.pt2e import qat_utils, utils

    if getattr(qat_utils, "_qdefend_cached", False):
        return
    export_pattern = utils._get_aten_graph_module_for_pattern

    def cached(pattern, example_inputs, is_cuda=False, **kwargs):
        try:
            key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        except (TypeError, AttributeError):
            return export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_CACHE:
            _PATTERN_CACHE[key] = export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERN_CACHE[key])

    def only_present(helper):
        def run(m, conv_fn, example_inputs, is_cuda):
            op = _CONV_OPS.get(getattr(conv_fn, "__name__", ""))
            if op is not None and not any(
                n.op == "call_function" and str(n.target) == op for n in m.graph.nodes
            ):
                return m
            return helper(m, conv_fn, example_inputs, is_cuda=is_cuda)

        return run

    utils._get_aten_graph_module_for_pattern = cached  # export_utils imports it at call time
    qat_utils._get_aten_graph_module_for_pattern = cached
    qat_utils._fuse_conv_bn_qat_helper = only_present(qat_utils._fuse_conv_bn_qat_helper)
    qat_utils._fold_conv_bn_qat_helper = only_present(qat_utils._fold_conv_bn_qat_helper)
    qat_utils._qdefend_cached = True


# --------------------------------------------------------------------------------------------
# Prepare / train-eval / convert


class QATGraphModule(torch.fx.GraphModule):
    """A prepared GraphModule whose .train()/.eval() switch BN, dropout and observers.

    Exported graphs ignore module.train(); making it a method of the class (not an instance
    attribute, as torchao's allow_exported_model_train_eval does) keeps it through deepcopy, so
    `outer.eval()` on a trainer model holding this encoder does the right thing.
    """

    def train(self, mode: bool = True):  # type: ignore[override]
        return set_train(self, mode)


def _as_qat_module(gm: torch.fx.GraphModule) -> QATGraphModule:
    class GraphModuleImpl(QATGraphModule):  # fx keeps one class per instance for its forward
        pass

    gm.__class__ = GraphModuleImpl
    for name in ("train", "eval"):  # torchao installs instance methods that raise
        gm.__dict__.pop(name, None)
    gm.recompile()
    return gm  # type: ignore[return-value]


def _export(module: nn.Module, example: torch.Tensor, train: bool) -> torch.fx.GraphModule:
    """torch.export a deep copy (export shares parameter storage) with a dynamic batch dim."""
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise QdefendError("prepare needs one example input tensor with a batch dim, e.g. x[:2].")
    if example.shape[0] < 2:  # batch sizes 0/1 are specialised by torch.export
        example = example[:1].expand(2, *example.shape[1:]).contiguous()
    m = copy.deepcopy(module).train(train)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(m, (example.detach(),), dynamic_shapes=({0: batch},))
    return ep.module()


def prepare_qat(module: nn.Module, example: torch.Tensor, quantizer=None) -> QATGraphModule:
    """A fake-quantized copy of `module` for QAT, in train mode (BN batch stats, observers on).

    The same float architecture and example shape always give the same state_dict keys, which
    is what checkpoint resume relies on (see load_qat_state_dict).
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    _install_pattern_cache()
    gm = prepare_qat_pt2e(_export(module, example, train=True), quantizer or make_quantizer(True))
    return set_train(_as_qat_module(_swap_conv_bn_div(gm, fast=True)), True)


def prepare_ptq(module: nn.Module, example: torch.Tensor, quantizer=None) -> torch.fx.GraphModule:
    """An observed copy of a float `module` for post-training calibration (BN folded, eval)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    gm = prepare_pt2e(_export(module, example, train=False), quantizer or make_quantizer(False))
    return gm


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, batches: Iterable) -> int:
    """Run batches (tensors or (x, ...) tuples) through a PTQ-prepared module; returns #samples."""
    n = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        prepared(x)
        n += x.shape[0]
    if n == 0:
        raise QdefendError("calibrate got no batches; pass a non-empty loader of inputs.")
    return n


def set_train(gm: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
    """Switch a prepared module between training and evaluation.

    train: BN uses batch statistics and updates running stats, dropout on, observers update the
    quantization ranges (unless freeze_observers was called). eval: BN uses running stats, dropout
    off, observers frozen, so outputs are deterministic and match the converted int8 model.
    """
    from torchao.quantization.pt2e import (
        disable_observer,
        enable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    _install_pattern_cache()
    (move_exported_model_to_train if mode else move_exported_model_to_eval)(gm)
    for m in gm.modules():
        m.training = mode
    observe = mode and not getattr(gm, _FROZEN_ATTR, False)
    gm.apply(enable_observer if observe else disable_observer)
    return gm


def freeze_observers(gm: torch.fx.GraphModule, frozen: bool = True) -> torch.fx.GraphModule:
    """Stop (or resume) range updates in train mode too, the usual last QAT epochs."""
    setattr(gm, _FROZEN_ATTR, frozen)
    return set_train(gm, gm.training)


def convert(prepared: torch.fx.GraphModule, *, fold_quantize: bool = True) -> torch.fx.GraphModule:
    """The int8 model of a prepared module, in eval mode; `prepared` is left as it is.

    fold_quantize=True stores int8 weights (for ONNX export and size); LiteRT needs False (its
    stablehlo lowering fails on folded int8 constants), so convert once per format.
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    _install_pattern_cache()
    m = _swap_conv_bn_div(copy.deepcopy(prepared), fast=False)
    move_exported_model_to_eval(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert_pt2e(m, fold_quantize=fold_quantize)
    move_exported_model_to_eval(out)
    for sub in out.modules():
        sub.training = False
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints


def qat_state_dict(gm: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict safe for safetensors.save_file: detached, contiguous, no shared storage."""
    return {k: v.detach().clone().contiguous() for k, v in gm.state_dict().items()}


def load_qat_state_dict(gm: torch.fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
    """Load a qat_state_dict into a freshly prepared module of the same architecture.

    Observer and fake-quant buffers change shape during training (per-channel ranges start empty),
    and the observer on/off flags are saved too; the modules' own _load_from_state_dict resize the
    buffers, and the current train/eval mode is re-applied so a checkpoint written during
    evaluation does not resume training with frozen observers. Keys must match exactly.
    """
    own = gm.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise QdefendError(
            f"checkpoint does not fit this QAT model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); prepare the same architecture with the same example shape."
        )
    # safetensors drops state_dict()._metadata; without the module versions torchao's observers
    # treat the tensors as version 1 and reset their eps buffer to float32 eps (changing scales)
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as e:  # same keys, other shapes: another width or input size
        lines = str(e).splitlines()
        raise QdefendError(
            f"checkpoint does not fit this QAT model ({(lines[1] if len(lines) > 1 else lines[0]).strip()}); "
            "prepare the same architecture with the same example shape."
        ) from None
    set_train(gm, gm.training)


# --------------------------------------------------------------------------------------------
# Inspection


def int8_weight_report(converted: torch.fx.GraphModule) -> dict:
    """Counts proving a converted graph holds int8 weights: int8 tensors, per-channel dequants,
    quantize ops, and weights of conv/linear that are still plain float (should be 0)."""
    qd = torch.ops.quantized_decomposed
    ops = {"quantize_per_tensor": 0, "dequantize_per_tensor": 0, "quantize_per_channel": 0,
           "dequantize_per_channel": 0}
    int8_tensors, int8_elems, float_weights, quantized_outputs = 0, 0, 0, []
    for node in converted.graph.nodes:
        if node.op == "get_attr":
            t = getattr(converted, node.target, None)  # type: ignore[arg-type]
            if isinstance(t, torch.Tensor) and t.dtype == torch.int8:
                int8_tensors += 1
                int8_elems += t.numel()
        if node.op != "call_function":
            continue
        for name in ops:
            op = getattr(qd, name)
            if node.target in (op.default, getattr(op, "tensor", None)):
                ops[name] += 1
        if node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default,
                           torch.ops.aten.conv1d.default, torch.ops.aten.convolution.default):
            w = node.args[1]
            if not (isinstance(w, torch.fx.Node) and w.op == "call_function"
                    and "dequantize" in str(w.target)):
                float_weights += 1
    out = [n for n in converted.graph.nodes if n.op == "output"][0]
    for arg in torch.fx.node.map_arg(out.args, lambda n: n) if out.args else ():
        args = arg if isinstance(arg, (list, tuple)) else [arg]
        quantized_outputs += ["dequantize" in str(a.target) for a in args if isinstance(a, torch.fx.Node)]
    return {
        "int8_weight_tensors": int8_tensors,
        "int8_weight_elements": int8_elems,
        "per_channel_weights": ops["dequantize_per_channel"],
        "quantize_ops": ops["quantize_per_tensor"] + ops["quantize_per_channel"],
        "dequantize_ops": ops["dequantize_per_tensor"] + ops["dequantize_per_channel"],
        "float_weights": float_weights,
        "output_quantized": bool(quantized_outputs) and all(quantized_outputs),
    }
