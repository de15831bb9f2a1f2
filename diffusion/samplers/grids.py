"""Host-side (numpy float64) path quantities and the time grids samplers step along.

Solver coefficients are fixed numbers once the grid is chosen, so they are computed here
in float64 from the model's Gaussian path (`paths.GaussianPath.host`: for a VP table the
same piecewise-linear log alpha_bar as `Schedule`'s continuous view; for continuous VP,
VE and flow paths their closed forms) and enter the compiled loop as constants. Default
grids span the path's [t_min, t_max] (1/T and 1 for a table).

Names: lam = logsnr / 2 = log(alpha / sigma) (DPM-Solver's lambda), sigma_ve = sigma /
alpha = exp(-lam) (the variance-exploding noise level of Karras et al.).
"""
from __future__ import annotations

import numpy as np

from diffusion.samplers.base import timesteps

SKIP_TYPES = ("logSNR", "time_uniform", "time_quadratic")
SIGMA_SCHEDULES = ("karras", "timesteps")
# EDM's sigma_max: Karras grids start at min(SIGMA_MAX, the trained maximum) by default.
SIGMA_MAX = 80.0


def alpha(schedule, t) -> np.ndarray:
    return schedule.host.alpha(t)


def sigma(schedule, t) -> np.ndarray:
    return schedule.host.sigma(t)


def lam(schedule, t) -> np.ndarray:
    """Half log-SNR log(alpha / sigma); +inf at t = 0."""
    return schedule.host.lam(t)


def t_from_lam(schedule, lam_) -> np.ndarray:
    """Inverse of lam(t) (exact for a table's piecewise-linear log alpha_bar)."""
    return schedule.host.t_from_lam(lam_)


def ve_sigma(schedule, t) -> np.ndarray:
    return schedule.host.ve_sigma(t)


def t_from_ve_sigma(schedule, sigma_ve) -> np.ndarray:
    return schedule.host.t_from_ve_sigma(sigma_ve)


def alpha_from_ve_sigma(schedule, sigma_ve) -> np.ndarray:
    """alpha where sigma / alpha = sigma_ve (1 / sqrt(1 + sigma_ve^2) on VP paths)."""
    return schedule.host.alpha_from_ve_sigma(sigma_ve)


def ve_sigma_range(schedule) -> tuple[float, float]:
    """(sigma_ve at t_min, sigma_ve at t_max; t = 1/T and 1 on a table): the noise levels
    the model was trained on."""
    return (float(ve_sigma(schedule, schedule.t_min)),
            float(ve_sigma(schedule, schedule.t_max)))


def clip_to_path(schedule, t: np.ndarray) -> np.ndarray:
    """Times of a discrete-index grid ((i + 1) / T) moved below the path's t_max (a
    no-op on tables; t = 1 becomes 1 - 1/T on a flow path, where alpha(1) = 0)."""
    return np.minimum(np.asarray(t, np.float64), schedule.t_max)


def dpm_solver_times(schedule, num_intervals: int, skip_type: str = "logSNR",
                     t_T: float = 1.0, t_0: float | None = None) -> np.ndarray:
    """num_intervals + 1 descending times from t_T to t_0 (default 1/T), DPM-Solver style.

    logSNR: uniform in lam; time_uniform: uniform in t; time_quadratic: uniform in sqrt(t).
    t_T = 1 stands for the path's t_max (1 on a table).
    """
    if num_intervals < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_intervals}")
    t_T = min(t_T, schedule.t_max)
    t_0 = schedule.t_min if t_0 is None else t_0
    if not 0.0 < t_0 < t_T <= 1.0:
        raise ValueError(f"need 0 < t_0 < t_T <= 1, got t_0={t_0}, t_T={t_T}")
    if skip_type == "logSNR":
        lams = np.linspace(lam(schedule, t_T), lam(schedule, t_0), num_intervals + 1)
        t = t_from_lam(schedule, lams)
    elif skip_type == "time_uniform":
        t = np.linspace(t_T, t_0, num_intervals + 1)
    elif skip_type == "time_quadratic":
        t = np.linspace(np.sqrt(t_T), np.sqrt(t_0), num_intervals + 1) ** 2
    else:
        raise ValueError(f"unknown skip_type {skip_type!r}; known: {SKIP_TYPES}")
    t[0], t[-1] = t_T, t_0  # exact end points despite the round trip through lam
    return t


DPM_SPACINGS = ("linspace", "leading", "trailing")


def dpm_discrete_indices(T: int, num_steps: int, spacing: str,
                         steps_offset: int = 0) -> np.ndarray:
    """The N descending indices diffusers' DPMSolverMultistepScheduler visits with
    `timestep_spacing`: linspace and leading place N + 1 points (from 0) and drop the
    lowest, leading with stride T // (N + 1) plus steps_offset; trailing is
    `base.timesteps`' trailing. The step after the last index goes to the final level."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset={steps_offset} applies to leading spacing only (as in "
                         f"diffusers), got {spacing!r}")
    if spacing == "linspace":
        idx = np.round(np.linspace(0, T - 1, num_steps + 1))[::-1][:-1]
    elif spacing == "leading":
        idx = (np.arange(num_steps + 1) * (T // (num_steps + 1)))[::-1][:-1] + int(steps_offset)
    elif spacing == "trailing":
        idx = timesteps(T, num_steps, "trailing")
    else:
        raise ValueError(f"unknown DPM-Solver spacing {spacing!r}; known: {DPM_SPACINGS}")
    idx = idx.astype(np.int64)
    if not 0 <= idx.min() <= idx.max() <= T - 1:
        raise ValueError(f"steps_offset={steps_offset} moves the timesteps out of [0, {T - 1}]")
    return idx


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: num_steps descending levels from sigma_max to sigma_min,
    (smax^(1/rho) + i / (N - 1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if num_steps == 1:
        return np.array([sigma_max], np.float64)
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return (hi + np.arange(num_steps) / (num_steps - 1) * (lo - hi)) ** rho


def ve_sigmas(schedule, num_steps: int, sigma_schedule: str = "karras", *,
              sigma_min: float | None = None, sigma_max: float | None = None,
              rho: float = 7.0, spacing: str = "trailing", steps_offset: int = 0,
              fractional_timesteps: bool = False) -> np.ndarray:
    """num_steps descending VE noise levels followed by 0 (shape [num_steps + 1]).

    karras: eq. 5 between sigma_min (default: the schedule's smallest trained level) and
    sigma_max (default: min(SIGMA_MAX = 80, the largest trained level), EDM's choice: a
    cosine table ends at 2e4 and a zero-terminal-SNR one at 4096, and ten steps spread
    from there waste most of their budget); values outside the trained range are clipped
    into it, since the network has never seen them. timesteps: sigma_ve at the discrete
    steps `timesteps(T, num_steps, spacing, steps_offset)`; with fractional_timesteps
    (linspace only) at the unrounded linspace(0, T - 1, N) indices, sigma_ve interpolated
    linearly in the index between the table's levels, as diffusers' Euler and Heun
    schedulers do (interpolation_type="linear").
    """
    if fractional_timesteps and (sigma_schedule != "timesteps" or spacing != "linspace"):
        raise ValueError("fractional_timesteps needs sigma_schedule='timesteps' and "
                         f"spacing='linspace', got {sigma_schedule!r}, {spacing!r}")
    lo, hi = ve_sigma_range(schedule)
    if sigma_schedule == "karras":
        s_min = lo if sigma_min is None else float(np.clip(sigma_min, lo, hi))
        s_max = min(SIGMA_MAX, hi) if sigma_max is None else float(np.clip(sigma_max, lo, hi))
        sig = karras_sigmas(num_steps, s_min, s_max, rho)
    elif sigma_schedule == "timesteps" and fractional_timesteps:
        if not 1 <= num_steps <= schedule.T:
            raise ValueError(f"num_steps must be in [1, {schedule.T}], got {num_steps}")
        idx = np.linspace(0, schedule.T - 1, num_steps)[::-1]
        table = ve_sigma(schedule, clip_to_path(schedule, np.arange(1, schedule.T + 1)
                                                / schedule.T))
        sig = np.interp(idx, np.arange(schedule.T), table)
    elif sigma_schedule == "timesteps":
        idx = timesteps(schedule.T, num_steps, spacing, steps_offset)
        sig = ve_sigma(schedule, clip_to_path(schedule, (idx + 1.0) / schedule.T))
    else:
        raise ValueError(f"unknown sigma_schedule {sigma_schedule!r}; "
                         f"known: {SIGMA_SCHEDULES}")
    return np.concatenate([sig, [0.0]])


def truncate_for_strength(times: np.ndarray, strength: float) -> np.ndarray:
    """Image-to-image: keep the descending grid points with t <= strength (a 1e-6 slack
    absorbs float error). The first kept point is where the image is noised to."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    kept = times[times <= strength + 1e-6]
    if kept.size < 2 or kept[0] <= 0.0:
        raise ValueError(f"strength {strength} leaves no sampling step on this grid; "
                         f"the lowest step starts at t={times[times > 0].min():.4g}")
    return kept
