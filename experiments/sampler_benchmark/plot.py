"""Metric-vs-NFE line plots drawn with Pillow (matplotlib is not a dependency).

    save_panels("plot.png", [Panel("sliced W2", {"ddim": (nfe, values)}, log_y=True)])

Each panel: log-scaled x (NFE), linear or log y, one coloured line with markers per
series, optional dashed horizontal reference lines (e.g. the true-sample floor).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

# 20 distinct colours (Tableau 10 and its light variants, darkened for white paper).
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
           (0, 0, 0), (90, 90, 255), (160, 0, 80), (0, 110, 90), (200, 160, 0),
           (100, 60, 160), (230, 80, 140), (60, 60, 60), (120, 200, 90), (250, 170, 120)]


@dataclasses.dataclass
class Panel:
    title: str
    series: dict  # label -> (xs, ys); non-finite or (log_y) non-positive ys are dropped
    log_y: bool = False
    hlines: dict = dataclasses.field(default_factory=dict)  # label -> y


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:.3g}"


def _draw_panel(draw: ImageDraw.ImageDraw, box, panel: Panel, x_ticks: Sequence[float],
                x_range: tuple, font, colors: dict) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 60, x1 - 10, y0 + 24, y1 - 30
    draw.text((x0 + 60, y0 + 4), panel.title, fill=(0, 0, 0), font=font)
    pts = {}
    for label, (xs, ys) in panel.series.items():
        keep = [(x, y) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not panel.log_y)]
        if keep:
            pts[label] = keep
    ys_all = [y for p in pts.values() for _, y in p] + list(panel.hlines.values())
    ys_all = [y for y in ys_all if math.isfinite(y) and (y > 0 or not panel.log_y)]
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    if not ys_all:
        draw.text((left + 10, top + 10), "no data", fill=(0, 0, 0), font=font)
        return
    fy = (lambda v: math.log10(v)) if panel.log_y else (lambda v: v)
    lo, hi = min(map(fy, ys_all)), max(map(fy, ys_all))
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    xlo, xhi = math.log10(x_range[0]) - 0.05, math.log10(x_range[1]) + 0.05
    px = lambda x: left + (math.log10(x) - xlo) / (xhi - xlo) * (right - left)
    py = lambda y: bottom - (fy(y) - lo) / (hi - lo) * (bottom - top)
    for t in x_ticks:
        draw.line((px(t), bottom, px(t), bottom + 4), fill=(0, 0, 0))
        draw.text((px(t) - 8, bottom + 6), _fmt(t), fill=(0, 0, 0), font=font)
    if panel.log_y:
        # Decades; with less than two decades in view also 2x and 5x.
        mults = (1, 2, 5) if hi - lo < 2 else (1,)
        y_ticks = [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)
                   for m in mults if lo <= e + math.log10(m) <= hi]
    else:
        y_ticks = _nice_ticks(lo, hi)
    for t in y_ticks:
        yy = py(t)
        draw.line((left, yy, right, yy), fill=(225, 225, 225))
        draw.text((x0 + 4, yy - 6), _fmt(t), fill=(0, 0, 0), font=font)
    for label, y in panel.hlines.items():
        if not (math.isfinite(y) and (y > 0 or not panel.log_y)):
            continue
        yy = py(y)
        for xs in range(int(left), int(right), 12):
            draw.line((xs, yy, min(xs + 6, right), yy), fill=(90, 90, 90))
        draw.text((right - 110, yy - 12), label, fill=(90, 90, 90), font=font)
    for label, p in pts.items():
        c = colors[label]
        xy = [(px(x), py(y)) for x, y in sorted(p)]
        if len(xy) > 1:
            draw.line(xy, fill=c, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=c)


def save_panels(path: str, panels: Sequence[Panel], *, title: str = "", cols: int = 2,
                panel_size: tuple = (420, 300), x_ticks: Sequence[float] = ()) -> None:
    """Writes a PNG grid of panels sharing one legend (series labels in order seen).
    x_ticks: labelled NFE values (default: every x in the data)."""
    labels = []
    for p in panels:
        labels += [l for l in p.series if l not in labels]
    colors = {l: _COLORS[i % len(_COLORS)] for i, l in enumerate(labels)}
    xs_all = sorted({x for p in panels for xs, _ in p.series.values() for x in xs})
    if not xs_all:
        raise ValueError("nothing to plot: every series is empty")
    # The axis spans the data; only the requested ticks are labelled.
    x_ticks = sorted(set(x_ticks) or set(xs_all))
    x_range = (min(xs_all[0], x_ticks[0]), max(xs_all[-1], x_ticks[-1]))
    rows = math.ceil(len(panels) / cols)
    legend_h = 20 * math.ceil(len(labels) / 4) + 10
    w, h = panel_size
    img = Image.new("RGB", (cols * w, rows * h + legend_h + 24), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 6), title, fill=(0, 0, 0), font=font)
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        _draw_panel(draw, (c * w, 24 + r * h, (c + 1) * w, 24 + (r + 1) * h), p, x_ticks,
                    x_range, font, colors)
    y = 24 + rows * h + 4
    for i, l in enumerate(labels):
        r, c = divmod(i, 4)
        x = 10 + c * (cols * w // 4)
        draw.line((x, y + r * 20 + 7, x + 20, y + r * 20 + 7), fill=colors[l], width=3)
        draw.text((x + 26, y + r * 20), l, fill=(0, 0, 0), font=font)
    draw.text((cols * w - 140, 24 + rows * h - 14), "NFE (log scale)", fill=(0, 0, 0),
              font=font)
    img.save(path)
