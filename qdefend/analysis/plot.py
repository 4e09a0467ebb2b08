"""Line plots drawn with Pillow only (no matplotlib): stacked panels sharing one x axis.

Each :class:`Panel` holds named series (NaN/None points are skipped, lines break there), optional
shaded x spans (e.g. the Golden Partition Zone) and an optional log-scaled y axis. Used by the
partition report; generic enough for any "metric vs cut" figure.

Paper: none (a drawing helper for the GPZ analysis of Liu et al., arXiv 2506.15412).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["Series", "Panel", "line_plot", "COLORS"]

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


@dataclass
class Series:
    label: str
    ys: Sequence[float | None]
    dashed: bool = False


@dataclass
class Panel:
    title: str
    ylabel: str
    series: list[Series]
    spans: list[tuple[float, float, str]] = field(default_factory=list)  # (x0, x1, label), shaded
    log_y: bool = False


def _ok(v, log: bool) -> bool:
    return v is not None and math.isfinite(float(v)) and (not log or float(v) > 0)


def line_plot(xs: Sequence[float], panels: Sequence[Panel], path: str | Path, *, xlabel: str = "cut",
              xticklabels: Sequence[str] | None = None, size: tuple[int, int] = (760, 300)) -> Path:
    """Write a PNG with one panel (``size`` each) per entry of ``panels`` over the shared ``xs``."""
    from PIL import Image, ImageDraw, ImageFont

    w, ph = size
    left, right, top, bottom = 80, 150, 28, 40
    img = Image.new("RGB", (w, ph * len(panels)), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [float(x) for x in xs]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (x1 - x0) * 0.04
    x0, x1 = x0 - pad, x1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    for k, panel in enumerate(panels):
        oy = k * ph
        tf = (lambda v: math.log10(float(v))) if panel.log_y else (lambda v: float(v))
        vals = [tf(v) for s in panel.series for v in s.ys if _ok(v, panel.log_y)] or [0.0, 1.0]
        y0, y1 = min(vals), max(vals)
        ypad = (y1 - y0) * 0.08 or max(abs(y1) * 0.1, 0.01)
        y0, y1 = y0 - ypad, y1 + ypad
        py = lambda v: oy + ph - bottom - (tf(v) - y0) / (y1 - y0) * (ph - top - bottom)  # noqa: E731
        for a, b, label in panel.spans:
            d.rectangle([px(a - 0.5), oy + top, px(b + 0.5), oy + ph - bottom], fill=(255, 243, 205))
            d.text((px(a - 0.5) + 3, oy + top + 2), label, fill=(150, 100, 0), font=font)
        d.text((left, oy + 8), panel.title, fill="black", font=font)
        d.line([(left, oy + top), (left, oy + ph - bottom), (w - right, oy + ph - bottom)], fill="black")
        for i in range(5):
            t = y0 + (y1 - y0) * i / 4
            yy = oy + ph - bottom - i / 4 * (ph - top - bottom)
            d.line([(left - 4, yy), (left, yy)], fill="black")
            d.text((4, yy - 6), f"{10**t:.3g}" if panel.log_y else f"{t:.3g}", fill="black", font=font)
        d.text((4, oy + 8), panel.ylabel[:12], fill=(90, 90, 90), font=font)
        for i, x in enumerate(xs):
            d.line([(px(x), oy + ph - bottom), (px(x), oy + ph - bottom + 4)], fill="black")
            lab = xticklabels[i] if xticklabels else f"{x:g}"
            d.text((px(x) - 3 * len(lab), oy + ph - bottom + 6), lab, fill="black", font=font)
        d.text(((w - right + left) // 2 - 10, oy + ph - 16), xlabel, fill="black", font=font)
        for j, s in enumerate(panel.series):
            color = COLORS[j % len(COLORS)]
            prev = None
            for x, v in zip(xs, s.ys):
                if not _ok(v, panel.log_y):
                    prev = None
                    continue
                pt = (px(x), py(v))
                if prev is not None:
                    _segment(d, prev, pt, color, s.dashed)
                d.ellipse([pt[0] - 3, pt[1] - 3, pt[0] + 3, pt[1] + 3], fill=color)
                prev = pt
            ly = oy + top + 14 * j
            _segment(d, (w - right + 10, ly + 6), (w - right + 30, ly + 6), color, s.dashed)
            d.text((w - right + 34, ly), s.label[:18], fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _segment(d, a, b, color, dashed: bool) -> None:
    if not dashed:
        d.line([a, b], fill=color, width=2)
        return
    n = max(1, int(math.dist(a, b) // 6))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(1.0, (i + 1) / n)
        d.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=color, width=2)
