"""The flow-matching samplers: Euler and the midpoint method on dx/dt = u(x, t) in t.

The probability-flow ODE of any Gaussian path is dx/dt = u(x, t), u = d_alpha x0 +
d_sigma eps with the model's x0 and eps (u = eps - x0 on the flow path alpha = 1 - t,
sigma = t). These samplers integrate it in t itself, as flow-matching models (SD3,
Flux, SiT) are sampled, on the grid t_k = shift(1 - k / N), k = 0..N, from t = 1 to 0,
with SD3's timestep shift

    shift(t) = shift t / (1 + (shift - 1) t)      (shift > 1 spends more steps at high noise;
                                                   1 = uniform; SD3 uses 3.0 at 1024 px)

  flow_euler     x_{k+1} = x_k + (t_{k+1} - t_k) u(x_k, t_k): NFE = N.
  flow_midpoint  x_mid = x_k + h/2 u(x_k, t_k), x_{k+1} = x_k + h u(x_mid, t_k + h/2)
                 (explicit midpoint, second order): NFE = 2 N.

Both start at t = 1 (on the flow path x_1 = eps exactly; the model must be evaluable
there, which a velocity, x0 or v model is and an eps model of a path with alpha(1) = 0
is not) and end at t = 0, where the last step lands on the ODE's x0 without evaluating
the model there. `t_max` moves the start below 1 (the grid is then shift applied to
1 - k / N, rescaled onto [0, t_max]). On a VP table or a VP path they run as well, but
near t = 0 sigma ~ sqrt(t) makes u singular and costs Euler-in-t accuracy there: VP
models are better served by DDIM / DPM-Solver, which step in sigma / alpha or logSNR.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.denoiser import Denoiser
from diffusion.paths import shift_time
from diffusion.samplers import grids
from diffusion.samplers.base import SampleInputs
from diffusion.samplers.plan import Form, Plan, Point, run_plan

METHODS = ("euler", "midpoint")


def flow_times(num_steps: int, shift: float = 1.0, t_max: float = 1.0) -> np.ndarray:
    """num_steps + 1 descending times from t_max to 0: t_max shift(1 - k / N)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    u = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
    return t_max * shift_time(u, float(shift))


def _velocity(schedule, p: Point) -> Form:
    """u = d_alpha x0 + d_sigma eps at the evaluation p (host coefficients)."""
    return float(schedule.host.d_alpha(p.t)) * p.x0 + float(schedule.host.d_sigma(p.t)) * p.eps


def plan_flow(schedule, num_steps: int, *, method: str = "euler", shift: float = 1.0,
              t_max: Optional[float] = None, strength: float = 1.0):
    if method not in METHODS:
        raise ValueError(f"unknown flow ODE method {method!r}; known: {METHODS}")
    t = flow_times(num_steps, shift, 1.0 if t_max is None else float(t_max))
    t = grids.truncate_for_strength(t, strength)
    plan = Plan(t_start=t[0])
    x = plan.start
    for t_k, t_next in zip(t[:-1], t[1:]):
        t_k, h = float(t_k), float(t_next - t_k)
        p = plan.evaluate(x, t_k)
        u = _velocity(schedule, p)
        if method == "midpoint":
            q = plan.evaluate(p.x + (0.5 * h) * u, t_k + 0.5 * h)
            u = _velocity(schedule, q)
        x = p.x + h * u
    return plan.compile(x)


def _sample(method, denoiser, key, shape, num_steps, *, y, guidance, x_T, sample_offset,
            x_init, strength, mask, callback, return_intermediates, shift, t_max):
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    tables = plan_flow(denoiser.schedule, num_steps, method=method, shift=shift,
                       t_max=t_max, strength=strength)
    return run_plan(tables, denoiser, key, shape, inputs, callback=callback,
                    return_intermediates=return_intermediates)


def sample_euler(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *,
                 y=None, guidance=None, x_T=None, sample_offset=0, x_init=None,
                 strength: float = 1.0, mask=None, callback=None,
                 return_intermediates: bool = False, shift: float = 1.0,
                 t_max: Optional[float] = None) -> jnp.ndarray:
    """Euler in t with SD3's timestep shift (see the module docstring)."""
    return _sample("euler", denoiser, key, shape, num_steps, y=y, guidance=guidance,
                   x_T=x_T, sample_offset=sample_offset, x_init=x_init, strength=strength,
                   mask=mask, callback=callback, return_intermediates=return_intermediates,
                   shift=shift, t_max=t_max)


def sample_midpoint(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *,
                    y=None, guidance=None, x_T=None, sample_offset=0, x_init=None,
                    strength: float = 1.0, mask=None, callback=None,
                    return_intermediates: bool = False, shift: float = 1.0,
                    t_max: Optional[float] = None) -> jnp.ndarray:
    """The explicit midpoint method in t with SD3's timestep shift."""
    return _sample("midpoint", denoiser, key, shape, num_steps, y=y, guidance=guidance,
                   x_T=x_T, sample_offset=sample_offset, x_init=x_init, strength=strength,
                   mask=mask, callback=callback, return_intermediates=return_intermediates,
                   shift=shift, t_max=t_max)
