"""Figures with matplotlib: line plots (stacked panels sharing one x axis) and labelled scatters.

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

__all__ = ["Series", "Panel", "line_plot", "scatter_plot", "pareto_front", "COLORS"]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


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
    """Write a PNG with one panel (``size`` pixels each) per entry of ``panels`` over the shared ``xs``."""
    from matplotlib.figure import Figure

    dpi = 100
    xs = [float(x) for x in xs]
    fig = Figure(figsize=(size[0] / dpi, size[1] * max(1, len(panels)) / dpi), dpi=dpi)
    axes = fig.subplots(max(1, len(panels)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        for a, b, label in panel.spans:
            ax.axvspan(a - 0.5, b + 0.5, color="#fff3cd", zorder=0)
            ax.text(a - 0.45, 0.97, label, transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                    color="#966400")
        for j, s in enumerate(panel.series):
            ys = [float(v) if _ok(v, panel.log_y) else math.nan for v in s.ys]
            ax.plot(xs, ys, "--" if s.dashed else "-", marker="o", markersize=4, color=COLORS[j % len(COLORS)],
                    label=s.label)
        if panel.log_y and any(_ok(v, True) for s in panel.series for v in s.ys):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if panel.series:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    axes[-1].set_xlabel(xlabel)
    if xs:
        axes[-1].set_xticks(xs, list(xticklabels) if xticklabels else [f"{x:g}" for x in xs])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, both axes to be maximised (e.g. decoder MSE
    and accuracy), ordered by x; a point equal to another is kept. Non-finite points never count."""
    ok = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    front = [i for i in ok if not any(points[j][0] >= points[i][0] and points[j][1] >= points[i][1]
                                      and points[j] != points[i] for j in ok)]
    return sorted(front, key=lambda i: points[i][0])


def scatter_plot(points: Sequence[tuple], path: str | Path, *, size: tuple[int, int] = (720, 480),
                 xlabel: str = "decoder MSE (higher = more private)", ylabel: str = "test accuracy",
                 title: str = "privacy vs utility (int8, Fashion-MNIST)", front: bool = False) -> Path:
    """Scatter of labelled points with matplotlib: ``(label, x, y)`` or ``(label, x, y, x_std,
    y_std)`` (error bars: the standard deviation over seeds); non-finite points are left out.
    ``front``: join the Pareto front (more x and more y both better) with a dashed line."""
    from matplotlib.figure import Figure

    pts = [p for p in points if math.isfinite(p[1]) and math.isfinite(p[2])]
    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax = fig.subplots()
    if front and pts:
        idx = pareto_front([(p[1], p[2]) for p in pts])
        ax.plot([pts[i][1] for i in idx], [pts[i][2] for i in idx], "--", color="#d62728", lw=1.2, zorder=2,
                label="Pareto front")
        ax.legend(fontsize=8, loc="lower left")
    for lab, x, y, *err in pts:
        xe, ye = (err + [None, None])[:2]
        if xe or ye:
            ax.errorbar(x, y, xerr=xe or None, yerr=ye or None, fmt="none", ecolor="0.4", elinewidth=1, capsize=3)
        ax.scatter([x], [y], s=40, color="#1f77b4", edgecolors="black", linewidths=0.6, zorder=3)
        ax.annotate(lab, (x, y), xytext=(6, 5), textcoords="offset points", fontsize=8)
    if not pts:
        ax.text(0.5, 0.5, "no finite points", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.15)  # room for the labels
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
