"""Where a sampler stops: t = 0 (clean data) or a positive time such as DPM-Solver's
default first trained step t = 1/T (a path's t_min). Solver errors must be measured
against the ODE solution at that time, not at t = 0.

Probe: data concentrated at a point (one Gaussian, std 1e-5, mean 0), on a straight
path with the schedule's T and t_min (alpha = 1, sigma = t: a VE path with sigma_max = 1).
Its eps along every probability-flow trajectory is constant and x is linear in sigma / alpha
and in t, so every consistent ODE solver, whether it steps in t (the flow samplers), in
sigma / alpha (DDIM, Euler, Heun) or in logSNR (DPM-Solver), maps its start state x_start
at t_start to x_end = (t_end / t_start) x_start exactly. (On a VP path x is not linear in
t: Euler in t is inexact there and its end read 9/T instead of 0.) A sampler's grid ends
where it ends on the schedule, since its end depends only on T and t_min (0, t_min, or a
trained time (i + 1) / T). t_start is the sampler's first evaluation; t_end is read off by
least squares and snapped to 0, or else to the nearest trained time (i + 1) / T of a
table, or t_min of a continuous path.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from diffusion.analytic.exact import exact_denoiser
from diffusion.analytic.gmm import from_covariances
from diffusion.paths import GaussianPath, VEPath

_POINT_STD = 1e-5


def _candidate_times(schedule: GaussianPath) -> np.ndarray:
    table = getattr(schedule, "alpha_bar_table", None)
    if table is not None:
        return np.arange(1, schedule.T + 1, dtype=np.float64) / schedule.T
    return np.array([schedule.t_min])


def sampler_end_time(sample: Callable, schedule: GaussianPath, num_steps: int = 10,
                     **options) -> float:
    """The time t_end at which the deterministic sampler `sample` (registry interface)
    stops on `schedule`, snapped to 0 or a trained time (a table's (i + 1) / T, a path's
    t_min); measured on the straight probe path (module docstring)."""
    probe = VEPath(sigma_max=1.0, sigma_min=schedule.t_min, T=schedule.T)  # sigma = t
    point = from_covariances([1.0], [[0.0, 0.0]], [np.eye(2) * _POINT_STD ** 2])
    den = exact_denoiser(point, probe, pred_type="x0")
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    x, path = jax.jit(lambda xt: sample(den, jax.random.key(1), xt.shape, num_steps, x_T=xt,
                                        return_intermediates=True, **options))(x_T)
    t_start = float(path.t[0])
    x, x_T = np.asarray(x, np.float64), np.asarray(x_T, np.float64)
    x_start = float(probe.host.start_std(t_start)) * x_T
    t_end = t_start * float(np.sum(x * x_start) / np.sum(x_start * x_start))
    candidates = _candidate_times(schedule)
    # Below a tenth of the smallest trained time: the sampler reached t = 0.
    if abs(t_end) < 0.1 * candidates[0]:
        return 0.0
    i = int(np.argmin(np.abs(np.log(candidates) - np.log(abs(t_end)))))
    return float(candidates[i])


def format_end_time(t_end: float, T: int) -> str:
    """0 -> "0", (i + 1) / T -> "1/T", "5/T", ..."""
    if t_end == 0.0:
        return "0"
    k = int(round(t_end * T))
    return "1/T" if k == 1 else f"{k}/T"
