"""PNG grids of images: originals above their reconstructions, one labelled row per source.

Pillow only (no matplotlib): each row is a caption strip and ``n`` images scaled up by an integer
factor with nearest-neighbour sampling, so pixels stay pixels. Grey images are drawn grey, RGB in
colour; values are [0,1] floats, clipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["save_grid"]

CAPTION_H = 14
GAP = 2


def _tile(img: np.ndarray, scale: int) -> np.ndarray:
    """(C, H, W) [0,1] -> (H*scale, W*scale, 3) uint8."""
    a = np.clip(np.asarray(img, np.float32), 0, 1)
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    a = (a.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    return a.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, *, n: int = 12, scale: int = 3) -> Path:
    """Write a PNG with one captioned row per ``(label, images (N, C, H, W))``; the first ``n`` images."""
    from PIL import Image, ImageDraw

    rows = [(label, np.asarray(imgs)) for label, imgs in rows if imgs is not None and len(imgs)]
    if not rows:
        raise ValueError("save_grid: no images to draw")
    n = min(n, min(len(imgs) for _, imgs in rows))
    _, h, w = rows[0][1].shape[1:]
    th, tw = h * scale, w * scale
    width = n * (tw + GAP) + GAP
    height = len(rows) * (CAPTION_H + th + GAP) + GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = GAP
    for label, imgs in rows:
        draw.text((GAP, y), label[: width // 6], fill=(0, 0, 0))
        y += CAPTION_H
        for i in range(n):
            canvas.paste(Image.fromarray(_tile(imgs[i], scale)), (GAP + i * (tw + GAP), y))
        y += th + GAP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
