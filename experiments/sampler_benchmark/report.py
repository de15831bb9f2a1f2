"""Turns benchmark rows (one dict per sampler and NFE) into results.csv, results.md,
metrics.png and TensorBoard scalars (tag "<sampler>/<metric>", step = NFE)."""
from __future__ import annotations

import csv
import math
import os
from typing import Optional, Sequence

import numpy as np

from diffusion.analytic.metrics import convergence_order
from experiments.sampler_benchmark.plot import Panel, save_panels

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
    """metrics: (column, panel title, log_y[, transform of the values]);
    references: column -> {label: y}. Lines are drawn at each row's actual NFE, ticks
    at the target NFEs."""
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
            panels.append(Panel(name, series, log_y, refs))
    targets = sorted({r["target_nfe"] for r in rows if r.get("target_nfe") is not None})
    if panels:
        save_panels(path, panels, title=title, x_ticks=targets)


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
