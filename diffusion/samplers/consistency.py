"""Consistency-model sampling (Song et al. 2023, Algorithm 1), one or several steps.

A consistency function f(x_ve, sigma) maps any point of a probability-flow trajectory
to its end x0. Here f is the Denoiser's x0 at t = t_from_ve_sigma(sigma), fed x_t =
alpha x_ve, which is exactly the consistency function when the Denoiser wraps a
consistency model (for an ordinary diffusion model it is only the posterior mean, and
this sampler then gives blurry averages).

    x0 = f(x_max, sigma_max)                       (x_max: the start state x_T)
    for sigma in sigmas:                           (descending, in (sigma_min, sigma_max))
        x0 = f(x0 + sqrt(sigma^2 - sigma_min^2) z, sigma)

NFE = num_steps = 1 + len(sigmas). `sigmas` defaults to the num_steps - 1 interior
points of a Karras grid (rho = 7) of num_steps + 1 levels from sigma_max to sigma_min.
sigma_min = 0.002 and sigma_max = 80 (the consistency-model defaults) are moved into the
schedule's trained range [sigma_ve(1/T), sigma_ve(1)] when they fall outside it, since
the model has never seen other levels (for DDPM's linear schedule sigma_min becomes
0.01, and sigma_max stays 80 < 157). As everywhere, x_T ~ N(0, I) is the VP state at
sigma_max, i.e. x_ve = x_T sqrt(1 + sigma_max^2).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.denoiser import Denoiser
from diffusion.samplers import grids
from diffusion.samplers.base import SampleInputs
from diffusion.samplers.plan import Plan, run_plan

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


def resolve_sigmas(schedule, num_steps: int, sigmas: Optional[Sequence[float]] = None,
                   sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                   rho: float = 7.0) -> tuple[float, float, np.ndarray]:
    """(sigma_min, sigma_max, intermediate sigmas) after moving into the trained range."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    lo, hi = grids.ve_sigma_range(schedule)
    s_min, s_max = max(float(sigma_min), lo), min(float(sigma_max), hi)
    if not s_min < s_max:
        raise ValueError(f"sigma range [{sigma_min}, {sigma_max}] misses the schedule's "
                         f"[{lo:.4g}, {hi:.4g}]")
    if sigmas is None or len(sigmas) == 0:
        mid = grids.karras_sigmas(num_steps + 1, s_min, s_max, rho)[1:-1]
    else:
        mid = np.asarray(sigmas, np.float64)
    if mid.size != num_steps - 1:
        raise ValueError(f"consistency sampling with num_steps={num_steps} needs "
                         f"{num_steps - 1} intermediate sigmas, got {mid.size}")
    if mid.size and (np.any(np.diff(mid) >= 0) or mid[0] >= s_max or mid[-1] <= s_min):
        raise ValueError(f"intermediate sigmas must decrease strictly inside "
                         f"({s_min:.4g}, {s_max:.4g}), got {mid.tolist()}")
    return s_min, s_max, mid


def plan_consistency(schedule, num_steps: int, *, sigmas=None, sigma_min: float = SIGMA_MIN,
                     sigma_max: float = SIGMA_MAX, rho: float = 7.0, strength: float = 1.0):
    s_min, s_max, mid = resolve_sigmas(schedule, num_steps, sigmas, sigma_min, sigma_max, rho)
    if strength < 1.0:
        # Image-to-image: start at sigma_ve(strength) if that is lower, keep the levels below.
        s_max = min(s_max, float(grids.ve_sigma(schedule, strength)))
        if s_max <= s_min:
            raise ValueError(f"strength {strength} is below the lowest noise level")
        mid = mid[mid < s_max]
    t_of = lambda s: float(grids.t_from_ve_sigma(schedule, s))
    a_of = lambda s: float(grids.alpha_from_ve_sigma(schedule, s))
    plan = Plan(t_start=t_of(s_max))
    x0 = plan.evaluate(plan.start, t_of(s_max)).x0
    for s in mid:
        s = float(s)
        x_ve = x0 + math.sqrt(s * s - s_min * s_min) * plan.noise()
        x0 = plan.evaluate(a_of(s) * x_ve, t_of(s)).x0
    return plan.compile(x0)


def sample(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *, y=None,
           guidance=None, x_T=None, sample_offset=0, x_init=None, strength: float = 1.0,
           mask=None, callback=None, return_intermediates: bool = False,
           sigmas: Optional[Sequence[float]] = None, sigma_min: float = SIGMA_MIN,
           sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> jnp.ndarray:
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    tables = plan_consistency(denoiser.schedule, num_steps, sigmas=sigmas,
                              sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                              strength=strength)
    return run_plan(tables, denoiser, key, shape, inputs, callback=callback,
                    return_intermediates=return_intermediates)
