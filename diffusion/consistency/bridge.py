"""Between sigma space (EDM, consistency models) and the samplers' VP Denoiser, both ways.

VP view of a VE model. With x_t = alpha (x0 + sigma_ve eps), alpha = 1 / sqrt(1 +
sigma_ve^2), x_t is a variance-preserving diffusion with alpha_bar = 1 / (1 + sigma_ve^2)
and sigma_ve = sigma_vp / alpha. `ve_schedule` tabulates alpha_bar on T = 1000 noise
levels of the Karras grid (rho = 7) from sigma_min to sigma_max, so the Schedule's
continuous view covers exactly [sigma_min, sigma_max], and `ve_denoiser` wraps a
sigma-space denoiser D(x_ve, sigma) as a Denoiser (pred_type "x0") that every sampler
can call: its net_fn recovers t = (c_noise + 1) / T from the schedule's c_noise, then
sigma_ve(t), and returns D(x_t / alpha(t), sigma_ve(t)).

Sigma view of a VP model. `sigma_space_x0` evaluates any Denoiser (eps, x0 or v
network, any schedule) at VE noise level sigma: t = schedule.t_from_ve_sigma(sigma)
and x0 = Denoiser(alpha(t) x_ve, t). This is how a diffusion model trained by this
codebase becomes a teacher for consistency distillation.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from diffusion.denoiser import Denoiser
from diffusion.forward_process import expand
from diffusion.schedules import Schedule

# (x_ve [B, H, W, C], sigma [B], y [B] or None) -> x0 [B, H, W, C]
SigmaDenoiser = Callable[[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


def karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """n ascending noise levels (float64): (smin^(1/rho) + i/(n-1) (smax^(1/rho) - ...))^rho."""
    if n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 points, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigma = (lo + np.arange(n, dtype=np.float64) / (n - 1) * (hi - lo)) ** rho
    sigma[0], sigma[-1] = sigma_min, sigma_max
    return sigma


@functools.lru_cache(maxsize=None)
def ve_schedule(T: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
                rho: float = 7.0) -> Schedule:
    """The VP schedule of a VE model on [sigma_min, sigma_max]; one object per argument set
    (cached), so it stays the same static value across calls."""
    sigma = karras_grid(T, float(sigma_min), float(sigma_max), float(rho))
    name = f"ve_karras(T={T},sigma={sigma_min:g}..{sigma_max:g},rho={rho:g})"
    return Schedule(name=name, alpha_bar_table=1.0 / (1.0 + sigma ** 2))


def ve_sigma(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """sigma_ve(t) = sigma(t) / alpha(t) of any schedule."""
    return schedule.sigma(t) / schedule.alpha(t)


def ve_denoiser(d_fn: SigmaDenoiser, schedule: Schedule,
                clip_x0: Optional[float] = None) -> Denoiser:
    """A Denoiser (pred_type "x0") over the sigma-space denoiser d_fn; see module docstring."""
    def net_fn(x_t, c_noise, y):
        t = (c_noise + 1.0) / schedule.T  # inverse of Schedule.c_noise
        x_ve = x_t / expand(schedule.alpha(t), x_t)
        return d_fn(x_ve, ve_sigma(schedule, t), y)
    return Denoiser(net_fn, schedule, pred_type="x0", learned_sigma=False, clip_x0=clip_x0)


def check_sigma_range(schedule: Schedule, sigma_min: float, sigma_max: float,
                      what: str = "teacher") -> None:
    """Raises unless the schedule's noise levels reach sigma_max (below its first grid
    point the continuous view interpolates towards clean data, so any sigma_min works)."""
    top = float(np.sqrt((1.0 - schedule.alpha_bar_table[-1]) / schedule.alpha_bar_table[-1]))
    if top < sigma_max * (1.0 - 1e-4):
        raise ValueError(
            f"the {what}'s schedule {schedule.name!r} reaches VE noise level {top:.4g} only, "
            f"below sigma_max={sigma_max}; lower consistency.sigma_max to at most {top:.4g}")


def sigma_space_x0(denoiser: Denoiser, x_ve: jnp.ndarray, sigma: jnp.ndarray,
                   y: Optional[jnp.ndarray] = None, guidance=None) -> jnp.ndarray:
    """x0 [B, H, W, C] of any Denoiser at VE input x_ve = x0 + sigma eps, sigma [B]."""
    sched = denoiser.schedule
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x_ve.shape[0],))
    t = sched.t_from_ve_sigma(sigma)
    x_t = expand(sched.alpha(t), x_ve) * x_ve
    return denoiser.predict(x_t, t, y, guidance).x0
