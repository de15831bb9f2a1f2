"""The same samplers on two Gaussian paths at equal NFE: VP (results.csv) against
rectified flow (results_flow.csv) of one analytic problem, side by side.

    python -m experiments.sampler_benchmark.run --compare experiments/sampler_benchmark/gmm2d
    # -> gmm2d/vp_vs_flow.md, gmm2d/vp_vs_flow.csv

For each sampler, target NFE and metric (rmse_ode, med_err_ode, rmse_x0, |loglik_gap|,
mode_tv; lower is better for all) the two values with their 95 % bootstrap intervals
(intervals.py) and the ratio flow / VP. A path is called better only where the two
intervals are disjoint ("flow" or "vp" in the `better` column); overlapping intervals
give "-", no claim. Rows whose actual NFE differs between the paths are not compared.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from experiments.sampler_benchmark import report

# (column, what it is)
METRICS = (("rmse_ode", "RMSE vs the exact ODE solution at the sampler's end time"),
           ("med_err_ode", "median per-sample error vs the exact ODE solution"),
           ("rmse_x0", "RMSE vs the exact ODE sample at t = 0"),
           ("loglik_gap", "|log-lik gap| (nats): |entropy baseline - mean log p|"),
           ("mode_tv", "mode-weight total variation"))
COLUMNS = ("sampler", "target_nfe", "metric", "nfe_vp", "vp", "vp_lo", "vp_hi",
           "nfe_flow", "flow", "flow_lo", "flow_hi", "ratio", "better")


def _value(row: dict, metric: str) -> Optional[tuple[float, float, float]]:
    """(value, lo, hi) of a metric of a row (|.| for loglik_gap), None if absent."""
    v, lo, hi = row.get(metric), row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    if v is None or lo is None or hi is None or not math.isfinite(v):
        return None
    if metric == "loglik_gap":  # smaller |gap| is better; an interval around 0 -> [0, .]
        a, b = abs(lo), abs(hi)
        lo, hi = (0.0, max(a, b)) if lo <= 0.0 <= hi else (min(a, b), max(a, b))
        v = abs(v)
    return float(v), float(lo), float(hi)


def _verdict(vp, flow) -> str:
    if flow[2] < vp[1]:
        return "flow"
    if vp[2] < flow[1]:
        return "vp"
    return "-"


def compare(vp_rows: list[dict], flow_rows: list[dict]) -> list[dict]:
    """One row per (sampler, target NFE, metric) present on both paths."""
    def index(rows):
        return {(r["sampler"], r["target_nfe"]): r for r in rows
                if r.get("target_nfe") is not None and r.get("nfe") is not None}
    vp, flow = index(vp_rows), index(flow_rows)
    out = []
    for label in report.sampler_labels(vp_rows):
        nfes = sorted(n for s, n in vp if s == label and (s, n) in flow)
        for metric, _ in METRICS:
            for n in nfes:
                a, b = vp[(label, n)], flow[(label, n)]
                va, vb = _value(a, metric), _value(b, metric)
                if va is None or vb is None:
                    continue
                better = _verdict(va, vb) if a["nfe"] == b["nfe"] else "nfe differs"
                out.append(dict(sampler=label, target_nfe=n, metric=metric,
                                nfe_vp=a["nfe"], vp=va[0], vp_lo=va[1], vp_hi=va[2],
                                nfe_flow=b["nfe"], flow=vb[0], flow_lo=vb[1], flow_hi=vb[2],
                                ratio=vb[0] / va[0] if va[0] > 0 else None, better=better))
    return out


def _cell(r: dict) -> str:
    """'VP [lo, hi] / flow [lo, hi]', the better path's value in bold."""
    f = report.fmt
    vp = f"{f(r['vp'])} [{f(r['vp_lo'])}, {f(r['vp_hi'])}]"
    fl = f"{f(r['flow'])} [{f(r['flow_lo'])}, {f(r['flow_hi'])}]"
    if r["better"] == "vp":
        vp = f"**{vp}**"
    elif r["better"] == "flow":
        fl = f"**{fl}**"
    nfe = f" ({r['nfe_vp']})" if r["nfe_vp"] != r["target_nfe"] else ""
    return f"{vp} / {fl}{nfe}"


def markdown(rows: list[dict], title: str, num_samples) -> str:
    nfes = sorted({r["target_nfe"] for r in rows})
    lines = [f"# {title}: VP (linear table, T = 1000) vs rectified flow at equal NFE", "",
             f"Each cell: VP value [95 % interval] / flow value [95 % interval]; n = "
             f"{num_samples} samples a row, percentile bootstrap over samples. Bold: that "
             f"path is better with disjoint intervals; otherwise no difference is claimed. "
             f"NFE in parentheses where the target is not reachable exactly.", ""]
    lines += ["## Counts (sampler x NFE cells with disjoint intervals)", "",
              "| metric | flow better | VP better | no claim | flow/VP ratio (median) |",
              "|---|---|---|---|---|"]
    for metric, _ in METRICS:
        sel = [r for r in rows if r["metric"] == metric]
        if not sel:
            continue
        ratios = sorted(r["ratio"] for r in sel if r["ratio"] is not None)
        med = report.fmt(ratios[len(ratios) // 2]) if ratios else "-"
        lines.append(f"| {metric} | {sum(r['better'] == 'flow' for r in sel)} | "
                     f"{sum(r['better'] == 'vp' for r in sel)} | "
                     f"{sum(r['better'] not in ('flow', 'vp') for r in sel)} | {med} |")
    for metric, what in METRICS:
        sel = [r for r in rows if r["metric"] == metric]
        if not sel:
            continue
        lines += ["", f"## {metric}: {what}", "",
                  "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for label in dict.fromkeys(r["sampler"] for r in sel):
            cells = {r["target_nfe"]: _cell(r) for r in sel if r["sampler"] == label}
            lines.append(f"| {label} | " + " | ".join(cells.get(n, "-") for n in nfes) + " |")
    return "\n".join(lines) + "\n"


def write(folder: str, vp_csv: str = "results.csv", flow_csv: str = "results_flow.csv"
          ) -> list[dict]:
    """Reads folder/vp_csv and folder/flow_csv, writes folder/vp_vs_flow.{csv,md}."""
    paths = [os.path.join(folder, f) for f in (vp_csv, flow_csv)]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"--compare needs {p}: run the problem with --schedule "
                                    f"{'flow' if p.endswith('_flow.csv') else 'linear'} first")
    vp_rows, flow_rows = (report.read_csv(p) for p in paths)
    rows = compare(vp_rows, flow_rows)
    if not rows:
        raise ValueError(f"{paths[0]} and {paths[1]} share no sampler and NFE with "
                         f"intervals (were they written with --bootstrap 0?)")
    ns = {r.get("num_samples") for r in vp_rows + flow_rows if r.get("num_samples")}
    report.write_csv(os.path.join(folder, "vp_vs_flow.csv"), rows)
    with open(os.path.join(folder, "vp_vs_flow.md"), "w") as f:
        f.write(markdown(rows, os.path.basename(os.path.normpath(folder)),
                         " / ".join(str(n) for n in sorted(ns)) or "?"))
    return rows
