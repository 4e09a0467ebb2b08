"""Decoder networks: released features (C_z, h, w) -> a [0, 1] image, shared by the inversion
attacks (:mod:`qdefend.attacks.inversion`) and the adversary that ARL trains against
(:mod:`qdefend.defenses.arl`). Training them is the attacks' business; this module holds only the
networks.

* :class:`ResDecoder`: the CEM / ResSFL attacker ``res_normN8C64`` (pre-activation ResBlocks,
  stride-2 ConvTranspose upsampling, sigmoid).
* :class:`InverseNet`: the plain decoder of He et al. (conv-BN-ReLU, 4x4 stride-2 ConvTranspose per
  factor-2 upsampling, sigmoid), with optional residual blocks.

Paper: He, Zhang, Lee, "Model Inversion Attacks against Collaborative Inference", ACSAC 2019;
Li et al., "ResSFL", CVPR 2022; Xia et al., "CEM", CVPR 2025 (arXiv 2503.00383).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ResBlock", "ResDecoder", "InverseNet"]


class _Res(nn.Module):
    """Post-activation residual block (plain decoder's optional blocks)."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class ResBlock(nn.Module):
    """Pre-activation residual block with BN, as the CEM code's ``ResBlock(bn=True)``:
    relu(bn0(x)) -> conv3x3 -> bn1 -> relu -> conv3x3, plus x (1x1 conv + BN when channels change)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(F.relu(self.bn0(x)))))
        return self.conv2(out) + self.shortcut(x)


def _n_up(feature_shape, image_shape) -> tuple[bool, int, int]:
    flat = len(feature_shape) != 3  # a vector cut: start from a 4x4 map
    h = 4 if flat else feature_shape[-1]
    return flat, h, max(0, round(math.log2(max(image_shape[1:]) / h)))


class _Decoder(nn.Module):
    """body (features -> a map at the image's scale), resize if the scale is off, out -> sigmoid."""

    body: nn.Module
    out: nn.Module
    flat: bool
    size: tuple[int, int]

    def forward(self, z):
        h = self.body(z.flatten(1) if self.flat else z)
        if tuple(h.shape[-2:]) != self.size:
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(h))


class ResDecoder(_Decoder):
    """CEM's ``res_normN_AE(N=blocks, internal_nc=width)``: features (C_z, h, w) -> [0,1] image."""

    def __init__(self, feature_shape, image_shape, blocks: int = 8, width: int = 64):
        super().__init__()
        c, H, W = image_shape
        self.flat, _, n_up = _n_up(feature_shape, image_shape)
        if self.flat:
            start: list[nn.Module] = [nn.Linear(int(np.prod(feature_shape)), width * 16), nn.Unflatten(1, (width, 4, 4)),
                                      ResBlock(width, width)]
        else:
            start = [ResBlock(feature_shape[0], width)]
        layers = [*start, nn.ReLU()]
        for _ in range(blocks):
            layers += [ResBlock(width, width), nn.ReLU()]
        for i in range(max(n_up, 2)):  # the code's two "upsampling or ResBlock" slots, then more upsamplings
            layers += [nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(width)] \
                if i < n_up else [ResBlock(width, width)]
            layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.out = ResBlock(width, c)
        self.size = (H, W)


class InverseNet(_Decoder):
    """The plain decoder: features (C_z, h, w) -> [0,1] image (C, H, W), transposed convs matched to
    the shapes (He et al.). ``res_blocks`` residual blocks follow the stem and each upsampling."""

    def __init__(self, feature_shape, image_shape, width: int = 32, res_blocks: int = 0):
        super().__init__()
        cz = feature_shape[0]
        c, H, W = image_shape
        self.flat, _, n_up = _n_up(feature_shape, image_shape)
        ch = width * 2 ** n_up
        start = [nn.Linear(int(np.prod(feature_shape)), ch * 16), nn.Unflatten(1, (ch, 4, 4))] if self.flat else \
                [nn.Conv2d(cz, ch, 3, padding=1, bias=False)]
        layers = [*start, nn.BatchNorm2d(ch), nn.ReLU(), *(_Res(ch) for _ in range(res_blocks))]
        for _ in range(n_up):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ch // 2), nn.ReLU(), *(_Res(ch // 2) for _ in range(res_blocks))]
            ch //= 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch, c, 3, padding=1)
        self.size = (H, W)
