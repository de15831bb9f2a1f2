"""Turns benchmark rows (one dict per sampler and NFE) into results.csv, results.md,
metrics.png and TensorBoard scalars (tag "<sampler>/<metric>", step = NFE)."""
from __future__ import annotations

import csv
import math
import os
from typing import Optional, Sequence

import numpy as np
# Figure + the Agg canvas directly, not pyplot: no global backend is chosen, nothing
# needs a display, and a figure is freed when it goes out of scope.
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from diffusion.analytic.metrics import convergence_order

# Columns that describe a row rather than measure it.
KEY_COLUMNS = ("sampler", "steps", "nfe", "deterministic")


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def columns_of(rows: Sequence[dict]) -> list[str]:
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def write_csv(path: str, rows: Sequence[dict]) -> None:
    cols = columns_of(rows)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def read_csv(path: str) -> list[dict]:
    """Rows written by write_csv, with numbers and booleans parsed back ("" -> None)."""
    def parse(v: str):
        if v == "":
            return None
        if v in ("True", "False"):
            return v == "True"
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v
    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def markdown_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def sampler_labels(rows: Sequence[dict]) -> list[str]:
    out = []
    for r in rows:
        # Reference rows (true samples, the ODE reference) have no target NFE.
        if r.get("target_nfe") is not None and r["sampler"] not in out:
            out.append(r["sampler"])
    return out


def pivot(rows: Sequence[dict], metric: str, nfes: Sequence[int]) -> str:
    """Markdown table: one row per sampler, one column per target NFE (actual NFE in
    parentheses where a sampler cannot hit the target exactly)."""
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for label in sampler_labels(rows):
        cells = []
        for n in nfes:
            r = next((r for r in rows if r["sampler"] == label and r.get("target_nfe") == n),
                     None)
            if r is None or r.get(metric) is None:
                cells.append("-")
            else:
                extra = f" ({r['nfe']})" if r["nfe"] != n else ""
                cells.append(fmt(r[metric]) + extra)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaders(rows: Sequence[dict], metric: str, nfes: Sequence[int],
            lower_is_better: bool = True) -> list[str]:
    out = []
    for n in nfes:
        cand = [r for r in rows if r.get("target_nfe") == n and r.get(metric) is not None
                and math.isfinite(r[metric])]
        if not cand:
            continue
        key = (lambda r: r[metric]) if lower_is_better else (lambda r: -r[metric])
        best = sorted(cand, key=key)
        runner = f", then {best[1]['sampler']} ({fmt(best[1][metric])})" if len(best) > 1 else ""
        out.append(f"- NFE {n}: {best[0]['sampler']} ({fmt(best[0][metric])}){runner}")
    return out


def fit_orders(rows: Sequence[dict], metric: str = "rmse_ode",
               floor: float = 0.0) -> list[dict]:
    """Per sampler: the log-log slope of `metric` over all NFE, and between the two
    largest NFE; points at or below 10 x floor (reference error) are left out."""
    out = []
    for label in sampler_labels(rows):
        pts = sorted((r["nfe"], r[metric]) for r in rows
                     if r["sampler"] == label and r.get(metric) is not None
                     and r[metric] > 10 * floor)
        if len(pts) < 2:
            continue
        nfe, err = zip(*pts)
        out.append(dict(sampler=label, nfe_range=f"{nfe[0]}-{nfe[-1]}",
                        order_all=convergence_order(nfe, err),
                        order_last_two=convergence_order(nfe[-2:], err[-2:])))
    return out


def plot(path: str, rows: Sequence[dict], metrics: Sequence[tuple],
         references: Optional[dict] = None, title: str = "") -> None:
    """Writes a PNG of metric-vs-NFE panels (log NFE axis, two panels a row, one legend).

    metrics: (column, panel title, log_y[, transform of the values]);
    references: column -> {label: y}, drawn as dashed horizontal lines. Lines are drawn
    at each row's actual NFE, ticks at the target NFEs. Non-finite values (and, on a log
    y axis, values <= 0) are left out."""
    panels = []
    for col, name, log_y, *fn in metrics:
        fn = fn[0] if fn else float
        series = {}
        for label in sampler_labels(rows):
            pts = sorted((r["nfe"], r[col]) for r in rows
                         if r["sampler"] == label and r.get(col) is not None)
            if pts:
                series[label] = ([p[0] for p in pts], [fn(p[1]) for p in pts])
        if series:
            refs = {k: fn(v) for k, v in (references or {}).get(col, {}).items()}
            panels.append((name, series, log_y, refs))
    targets = sorted({r["target_nfe"] for r in rows if r.get("target_nfe") is not None})
    if panels:
        _save_panels(path, panels, title, targets)


def _shown(y, log_y: bool) -> bool:
    return y is not None and math.isfinite(y) and (y > 0 or not log_y)


def _save_panels(path: str, panels: list, title: str, x_ticks: Sequence[float]) -> None:
    labels = []
    for _, series, _, _ in panels:
        labels += [l for l in series if l not in labels]
    if not any(xs for _, series, _, _ in panels for xs, _ in series.values()):
        raise ValueError("nothing to plot: every series is empty")
    # tab20: its 10 dark shades for the first 10 series, then the 10 light ones.
    colors = {l: colormaps["tab20"]((2 * i) % 20 + (i // 10) % 2) for i, l in enumerate(labels)}
    cols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / cols)
    legend_cols = 2 * cols  # a one-panel figure is too narrow for four entries a row
    legend_rows = math.ceil(len(labels) / legend_cols)
    fig = Figure(figsize=(5.6 * cols, 3.6 * nrows + 0.3 * legend_rows + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    handles = {}
    for i, (name, series, log_y, refs) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        ax.set_title(name, fontsize=9)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        any_point = False
        for label, (xs, ys) in series.items():
            pts = sorted((x, y) for x, y in zip(xs, ys) if _shown(y, log_y))
            if pts:
                any_point = True
                (line,) = ax.plot(*zip(*pts), marker="o", ms=3.5, lw=1.5, color=colors[label])
                handles.setdefault(label, line)
        for label, y in refs.items():
            if _shown(y, log_y):
                ax.axhline(y, ls="--", lw=1, color="0.4")
                ax.annotate(label, (1, y), xycoords=("axes fraction", "data"),
                            xytext=(-4, 3), textcoords="offset points", ha="right",
                            fontsize=7, color="0.3")
        if not any_point:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center")
        if x_ticks:
            ax.set_xticks(list(x_ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v) if v != int(v)
                                                       else str(int(v))))
        ax.set_xlabel("NFE (log scale)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", color="0.9")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.legend([handles[l] for l in labels if l in handles],
               [l for l in labels if l in handles], loc="lower center", ncol=legend_cols,
               fontsize=8, frameon=False)
    bottom = (0.3 * legend_rows + 0.3) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 0.97 if title else 1))
    fig.savefig(path)


def write_tensorboard(logdir: str, rows: Sequence[dict], metrics: Sequence[str]) -> None:
    from diffusion.writers import MetricWriter
    with MetricWriter(logdir) as writer:
        for r in rows:
            if r.get("nfe") is None or r.get("target_nfe") is None:
                continue
            scalars = {f"{r['sampler']}/{m}": r[m] for m in metrics
                       if r.get(m) is not None and np.isfinite(r[m])}
            if scalars:
                writer.write_scalars(r["nfe"], scalars)


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
