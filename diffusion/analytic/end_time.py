"""Where a sampler stops: t = 0 (clean data) or a positive time such as DPM-Solver's
default first trained step t = 1/T. Solver errors must be measured against the ODE
solution at that time, not at t = 0.

Probe: data concentrated at a point (one Gaussian, std 1e-5, mean 0). Its eps along
every probability-flow trajectory is constant, so any sampler that is exact for
constant eps (every consistent ODE solver) maps x_T to x_end = (sigma_end / sigma_T) x_T
exactly. sigma_end is read off by least squares and snapped to 0 or the nearest
trained time (i + 1) / T.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from diffusion.analytic.exact import exact_denoiser
from diffusion.analytic.gmm import from_covariances
from diffusion.schedules import Schedule

_POINT_STD = 1e-5


def sampler_end_time(sample: Callable, schedule: Schedule, num_steps: int = 10,
                     **options) -> float:
    """The time t_end at which the deterministic sampler `sample` (registry interface)
    stops, snapped to 0 or a trained time (i + 1) / T."""
    point = from_covariances([1.0], [[0.0, 0.0]], [np.eye(2) * _POINT_STD ** 2])
    den = exact_denoiser(point, schedule)
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    x = jax.jit(lambda xt: sample(den, jax.random.key(1), xt.shape, num_steps, x_T=xt,
                                  **options))(x_T)
    x, x_T = np.asarray(x, np.float64), np.asarray(x_T, np.float64)
    sigma_T = float(schedule.sigma(1.0))
    sigma_end = sigma_T * float(np.sum(x * x_T) / np.sum(x_T * x_T))
    sigma_grid = np.sqrt(1.0 - np.asarray(schedule.alpha_bar_table, np.float64))
    # Below a tenth of the smallest trained noise level: the sampler reached t = 0.
    if abs(sigma_end) < 0.1 * sigma_grid[0]:
        return 0.0
    i = int(np.argmin(np.abs(np.log(sigma_grid) - np.log(abs(sigma_end)))))
    return (i + 1.0) / schedule.T


def format_end_time(t_end: float, T: int) -> str:
    """0 -> "0", (i + 1) / T -> "1/T", "5/T", ..."""
    if t_end == 0.0:
        return "0"
    k = int(round(t_end * T))
    return "1/T" if k == 1 else f"{k}/T"
