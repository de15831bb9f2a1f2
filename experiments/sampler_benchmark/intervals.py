"""95 % percentile-bootstrap intervals of the analytic metrics, over the samples of a row.

    per = PerSample(sq_err_ode=..., err_ode=..., sq_err_x0=..., loglik=..., modes=...)
    bounds = bootstrap(per, baseline=..., true_weights=..., num_resamples=1000, seed=0)
    # {"rmse_ode_lo": ..., "rmse_ode_hi": ..., "loglik_gap_lo": ..., ...}

Every statistic of one row is recomputed on the same resampled index sets, B sets of n
indices drawn with replacement from the row's n samples. The interval says how much a
metric moves with the draw of x_T (and, for stochastic samplers, of their noise); it does
not include the error of the entropy baseline (a fixed Monte-Carlo estimate from its own
samples, shared by every row) nor the reference solve's own error (stated apart).
mode_tv's interval treats the true mode weights as fixed (with --conditional, those of
all n labels); a total variation of resampled weights is larger on average than that
of the sample, so near the finite-sample floor its percentile interval sits above the
estimate (gmm2d, true samples: 0.018 [0.012, 0.036]).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

LEVEL = 0.95


@dataclasses.dataclass
class PerSample:
    """Per-sample values [n] of one row; None where the row has no such metric
    (stochastic samplers have no ODE error)."""
    loglik: np.ndarray
    modes: np.ndarray                       # index of each sample's mode
    sq_err_ode: Optional[np.ndarray] = None  # mean over dims of the squared ODE error
    sq_err_x0: Optional[np.ndarray] = None   # the same against the t = 0 reference


def _bounds(stats: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(stats, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(lo), float(hi)


def bootstrap(per: PerSample, *, baseline: float, true_weights: np.ndarray,
              num_resamples: int = 1000, seed: int = 0) -> dict:
    """{metric_lo, metric_hi} for rmse_ode, med_err_ode, rmse_x0 (rows with ODE errors),
    loglik_gap and mode_tv; empty when num_resamples is 0."""
    if num_resamples <= 0:
        return {}
    n = per.loglik.shape[0]
    rng = np.random.default_rng(seed)
    out = {}
    # Blocks of resamples keep the [B, n] index matrix small for large n.
    block = max(1, min(num_resamples, 2_000_000 // max(n, 1)))
    stats = {k: [] for k in ("rmse_ode", "med_err_ode", "rmse_x0", "loglik_gap", "mode_tv")}
    k = int(true_weights.shape[0])
    done = 0
    while done < num_resamples:
        b = min(block, num_resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        stats["loglik_gap"].append(baseline - per.loglik[idx].mean(1))
        counts = np.stack([np.bincount(per.modes[i], minlength=k) for i in idx])
        stats["mode_tv"].append(0.5 * np.abs(counts / n - true_weights[None]).sum(1))
        if per.sq_err_ode is not None:
            sq = per.sq_err_ode[idx]
            stats["rmse_ode"].append(np.sqrt(sq.mean(1)))
            stats["med_err_ode"].append(np.median(np.sqrt(sq), axis=1))
        if per.sq_err_x0 is not None:
            stats["rmse_x0"].append(np.sqrt(per.sq_err_x0[idx].mean(1)))
        done += b
    for name, parts in stats.items():
        if parts:
            out[f"{name}_lo"], out[f"{name}_hi"] = _bounds(np.concatenate(parts))
    return out


def sq_errors(x, x_ref) -> np.ndarray:
    """[n] mean over dimensions of (x - x_ref)^2, in float64."""
    d = (np.asarray(x, np.float64) - np.asarray(x_ref, np.float64)).reshape(x.shape[0], -1)
    return np.mean(d * d, axis=1)
