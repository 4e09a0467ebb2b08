"""KLAS-style layer similarity: KL divergence between intermediate representations.

Two questions for a split encoder: how far does int8 quantisation move each cut candidate's
representation (float vs int8), and how much does the representation change from one candidate
to the next (a small change = a place where moving the cut buys little)?

* :func:`channel_kl` (float vs int8, same shape): at every spatial position, softmax over the
  channels turns the activation vector into a distribution; KL(p_float || p_int8) is averaged over
  positions and images. Channels are what a layer's units "vote" on at a location, so this compares
  what each location encodes, not the raw scale. Temperature 1 on the raw activations.
* :func:`pooled_channel_kl` (adjacent cuts with the same channel count): the same on spatially
  averaged activations (a global-average-pooled channel distribution per image), which works across
  different spatial sizes; ``None`` when the channel counts differ.
* :func:`neighbour_kl` (adjacent cuts, any shapes): for each image i, P_A(j | i) = softmax over the
  other images j of -||a_i - a_j||^2 / s_A, with s_A the mean off-diagonal squared distance of
  layer A (scale-free, as in SNE); KL(P_A || P_B) averaged over i. It compares which images a
  layer treats as neighbours, so it is defined between layers of any width and resolution.
* :func:`int8_stage_chain`: the int8 side: every encoder child (stem, stage k) is post-training
  quantised on its own with the repo's pt2e XNNPACK-style scheme (qdefend.quant, calibrated on the
  float activations that reach it), and the int8 stages run chained, so quantisation error
  accumulates along the encoder as in a converted int8 encoder.

Paper: Sanyal et al., "KLAS: Using Similarity to Stitch Neural Networks for Improved
Accuracy-Efficiency Tradeoffs", ICLR 2026 (KL divergence between intermediate representations).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F
from .. import quant

__all__ = ["channel_kl", "pooled_channel_kl", "neighbour_kl", "int8_stage_chain", "float_int8_kl"]


def _as_maps(t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t).float()
    return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t  # vectors: one "position"


def channel_kl(p_feats, q_feats, temperature: float = 1.0) -> float:
    """Mean over images and positions of KL(softmax_c(p) || softmax_c(q)); same shapes (N, C, ...)."""
    p, q = _as_maps(p_feats), _as_maps(q_feats)
    if p.shape != q.shape:
        raise ValueError(f"channel_kl needs equal shapes, got {tuple(p.shape)} and {tuple(q.shape)}")
    lp, lq = F.log_softmax(p / temperature, dim=1), F.log_softmax(q / temperature, dim=1)
    return float((lp.exp() * (lp - lq)).sum(1).mean().clamp_min(0.0))


def pooled_channel_kl(a_feats, b_feats, temperature: float = 1.0) -> float | None:
    """KL of spatially averaged channel distributions; None when the channel counts differ."""
    a, b = _as_maps(a_feats), _as_maps(b_feats)
    if a.shape[:2] != b.shape[:2]:
        return None
    return channel_kl(a.flatten(2).mean(2), b.flatten(2).mean(2), temperature)


def _neighbour_logp(f: torch.Tensor) -> torch.Tensor:
    f = f.reshape(len(f), -1).double()
    d = torch.cdist(f, f).pow(2)
    n = len(f)
    off = ~torch.eye(n, dtype=torch.bool)
    scale = d[off].mean().clamp_min(1e-12)
    logits = (-d / scale).masked_fill(~off, float("-inf"))
    return F.log_softmax(logits, dim=1).masked_fill(~off, 0.0)


def neighbour_kl(a_feats, b_feats) -> float:
    """Mean over images i of KL(P_A(. | i) || P_B(. | i)) (see the module docstring); N >= 3."""
    a, b = torch.as_tensor(a_feats), torch.as_tensor(b_feats)
    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"neighbour_kl needs the same N >= 3 images in both layers, got {len(a)} and {len(b)}")
    la, lb = _neighbour_logp(a), _neighbour_logp(b)
    return float((la.exp() * (la - lb)).sum(1).mean().clamp_min(0.0))


def int8_stage_chain(encoder: nn.Sequential, calib_x: torch.Tensor) -> "OrderedDict[str, nn.Module]":
    """Each child of ``encoder`` post-training quantised to int8 on the float activations that reach
    it from ``calib_x`` (normalised images). Returns {child name: converted int8 module}."""
    import warnings


    out: OrderedDict[str, nn.Module] = OrderedDict()
    h = calib_x
    encoder.eval()
    for name, mod in encoder.named_children():
        with warnings.catch_warnings():  # torch.export internals, not the user's
            warnings.simplefilter("ignore", FutureWarning)
            prepared = quant.prepare_ptq(mod, h[:2])
            quant.calibrate(prepared, [h])
            out[name] = quant.convert(prepared)
        with torch.no_grad():
            h = mod(h)
    return out


@torch.no_grad()
def float_int8_kl(encoder: nn.Sequential, int8: "OrderedDict[str, nn.Module]", x: torch.Tensor) -> dict[str, float]:
    """{child name: channel_kl(float output, chained int8 output)} for images ``x`` (normalised)."""
    out: dict[str, float] = {}
    hf = hq = x
    for name, mod in encoder.named_children():
        hf, hq = mod(hf), int8[name](hq)
        out[name] = channel_kl(hf, hq)
    return out
