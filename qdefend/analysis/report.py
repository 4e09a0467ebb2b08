"""The partition report: a rich table per cut, its notes, and the files (JSON, PNG plot, PNG grid).

Reads the dict :func:`qdefend.analysis.partition.analyze_partition` returns. The MSE bound is
printed next to the measured attack MSE; where the (estimated) bound exceeds the MSE an attacker
really reached, the row says "estimate is loose" -- the estimate cannot be a valid bound there.

Paper: Liu et al., GPZ, arXiv 2506.15412 (R_c^2 and the zone); Xia et al., CEM, CVPR 2025
(arXiv 2503.00383) for the bound.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..plainjson import plain
from .plot import Panel, Series, line_plot

__all__ = ["save_report", "render", "loose_cuts"]


def _fmt(v: Any, spec: str = ".4g", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def _si(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def loose_cuts(result: dict) -> list[int]:
    """Cuts where the estimated MSE bound exceeds the measured attack MSE."""
    return [r["cut"] for r in result["cuts"] if r.get("loose")]


def render(result: dict, console) -> None:
    """Print the per-cut table, the zone and the notes."""
    from rich.table import Table

    res = result["resolved"]
    attack = any("attack" in r for r in result["cuts"])
    key = "drop_pred" if res["zone_labels"] == "predicted" else "drop_true"
    t = Table(title=f"where to cut: {res['model']} (width {res['width']:g}) on {res['dataset']}")
    for c in ("cut", "shape", "R2 true", "R2 pred", "drop", "zone", "MACs", "params", "int8 KiB"):
        t.add_column(c, justify="left" if c in ("shape", "zone") else "right")
    for r in result["cuts"]:
        t.add_row(str(r["cut"]) + ("*" if r.get("from_run") else ""), "x".join(map(str, r["shape"])),
                  _fmt(r["r2_true"]), _fmt(r["r2_pred"]), _fmt(r[key], "+.3f"), r["zone"],
                  _si(r["macs"]), _si(r["params"]), f"{r['int8_bytes'] / 1024:.1f}")
    console.print(t)
    t = Table(title=f"privacy per cut (Gaussian feature noise sigma {res['sigma']:g})")
    cols = ["cut", "KL f||q", "KL->next", "H(x|z~) nats", "MSE bound*"] + (["attack MSE", "SSIM", ""] if attack else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "" else "right")
    for r in result["cuts"]:
        e = r["entropy"]
        cells = [str(r["cut"]), _fmt(r["kl_float_int8"], ".3g"), _fmt(r["kl_next"], ".3g"),
                 "-" if e["vacuous"] else _fmt(e["h_cond_nats"], ".5g"),
                 "vacuous" if e["vacuous"] else _fmt(r["mse_bound"], ".3g")]
        if attack:
            a = r.get("attack", {})
            cells += [_fmt(a.get("mse"), ".4f"), _fmt(a.get("ssim"), ".3f"), "estimate is loose" if r.get("loose") else ""]
        t.add_row(*cells)
    console.print(t)
    z = result["zone"]
    p = z["primary"]
    console.print(f"Golden Partition Zone (R_c^2 on {res['zone_labels']} labels): cuts {p['start_cut']}..{p['end_cut']} "
                  f"(entered by a {100 * p['drop']:.1f}% drop)"
                  + (f"; second zone: cuts {z['second']['start_cut']}..{z['second']['end_cut']}" if z["second"] else ""))
    ev = result["eval"]
    console.print(f"analysis model: test accuracy {100 * ev['accuracy']:.2f}% on {ev['images']} images"
                  + (f"; mean-image floor MSE {result['baseline']['mse']:.4f}" if result.get("baseline") else ""))
    console.print("* MSE bound = exp(2 H(x|z~)/d) / (2 pi e) (CEM) with H(x|z~) an ESTIMATE, see the note")
    if res.get("from_cut"):
        console.print(f"cut* = the --from run's trained edge (cuts 1..{res['from_cut']})")
    for n in result["notes"]:
        console.print(f"note: {n}")
    loose = loose_cuts(result)
    if loose:
        console.print(f"estimate is loose at cut(s) {', '.join(map(str, loose))}: the estimated bound exceeds the "
                      "measured attack MSE")
    for f in result.get("files", []):
        console.print(f"wrote {f}")


def save_report(result: dict, out: str | Path, *, grid=None) -> list[str]:
    """Write OUT/partition.json, OUT/partition.png and (with a grid) OUT/reconstructions.png."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "partition.json", out / "partition.png"]
    rows = result["cuts"]
    xs = [r["cut"] for r in rows]
    z = result["zone"]
    spans = [(z["primary"]["start_cut"], z["primary"]["end_cut"], "GPZ")]
    if z["second"]:
        spans.append((z["second"]["start_cut"], z["second"]["end_cut"], "GPZ-2"))
    panels = [Panel("intra-class radius R_c^2 per cut", "R_c^2",
                    [Series("true labels", [r["r2_true"] for r in rows]),
                     Series("predicted labels", [r["r2_pred"] for r in rows], dashed=True)], spans=spans, log_y=True)]
    if any("attack" in r for r in rows):
        floor = (result.get("baseline") or {}).get("mse")
        series = [Series("decoder attack MSE", [r.get("attack", {}).get("mse") for r in rows])]
        if floor is not None:
            series.append(Series("mean-image floor", [floor] * len(rows), dashed=True))
        if any(r["mse_bound"] is not None for r in rows):
            series.append(Series("MSE bound (est.)", [r["mse_bound"] for r in rows], dashed=True))
        panels.append(Panel("inversion MSE per cut (higher = more private)", "MSE", series, spans=spans))
    if any(r["kl_float_int8"] is not None for r in rows):
        panels.append(Panel("KL(float || int8) per cut", "KL", [Series("channel KL", [r["kl_float_int8"] for r in rows])]))
    res = result["resolved"]
    line_plot(xs, panels, files[1], xlabel=f"cut ({res['model']}, {res['dataset']})")
    if grid:
        from ..attacks.grid import save_grid

        files.append(out / "reconstructions.png")
        save_grid(grid, files[-1], n=min(8, min(len(g[1]) for g in grid)))
    result = {**result, "files": [str(f) for f in files]}
    tmp = files[0].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plain(result), indent=2, sort_keys=True) + "\n")
    tmp.replace(files[0])
    return [str(f) for f in files]
