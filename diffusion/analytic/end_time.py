"""Where a sampler stops: t = 0 (clean data) or a positive time such as DPM-Solver's
default first trained step t = 1/T (a path's t_min). Solver errors must be measured
against the ODE solution at that time, not at t = 0.

Probe: data concentrated at a point (one Gaussian, std 1e-5, mean 0). Its eps along
every probability-flow trajectory is constant, so any sampler that is exact for
constant eps (every consistent ODE solver) maps its start state x_start at t_start to
x_end = (sigma_end / sigma(t_start)) x_start exactly, on any Gaussian path. t_start is
the sampler's first evaluation; sigma_end is read off by least squares and snapped to 0,
or else to the nearest trained time (i + 1) / T of a table, or t_min of a continuous path.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from diffusion.analytic.exact import exact_denoiser
from diffusion.analytic.gmm import from_covariances
from diffusion.paths import GaussianPath

_POINT_STD = 1e-5


def _candidate_times(schedule: GaussianPath) -> np.ndarray:
    table = getattr(schedule, "alpha_bar_table", None)
    if table is not None:
        return np.arange(1, schedule.T + 1, dtype=np.float64) / schedule.T
    return np.array([schedule.t_min])


def sampler_end_time(sample: Callable, schedule: GaussianPath, num_steps: int = 10,
                     **options) -> float:
    """The time t_end at which the deterministic sampler `sample` (registry interface)
    stops, snapped to 0 or a trained time (a table's (i + 1) / T, a path's t_min)."""
    point = from_covariances([1.0], [[0.0, 0.0]], [np.eye(2) * _POINT_STD ** 2])
    # x0-parameterised: defined wherever sigma > 0, also where alpha = 0 (flow, t = 1).
    den = exact_denoiser(point, schedule, pred_type="x0")
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    x, path = jax.jit(lambda xt: sample(den, jax.random.key(1), xt.shape, num_steps, x_T=xt,
                                        return_intermediates=True, **options))(x_T)
    t_start = float(path.t[0])
    x, x_T = np.asarray(x, np.float64), np.asarray(x_T, np.float64)
    x_start = float(schedule.host.start_std(t_start)) * x_T
    sigma_start = float(schedule.host.sigma(t_start))
    sigma_end = sigma_start * float(np.sum(x * x_start) / np.sum(x_start * x_start))
    candidates = _candidate_times(schedule)
    sigma_grid = schedule.host.sigma(candidates)
    # Below a tenth of the smallest trained noise level: the sampler reached t = 0.
    if abs(sigma_end) < 0.1 * sigma_grid[0]:
        return 0.0
    i = int(np.argmin(np.abs(np.log(sigma_grid) - np.log(abs(sigma_end)))))
    return float(candidates[i])


def format_end_time(t_end: float, T: int) -> str:
    """0 -> "0", (i + 1) / T -> "1/T", "5/T", ..."""
    if t_end == 0.0:
        return "0"
    k = int(round(t_end * T))
    return "1/T" if k == 1 else f"{k}/T"
