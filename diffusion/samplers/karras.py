"""Euler, Heun (Karras et al. 2022, "EDM") and Euler ancestral, in VE sigma space.

Any model on any Gaussian path (VP, VE, flow: `diffusion.paths`) is a VE model:
x_ve = x_t / alpha, sigma_ve = sigma / alpha, and the
denoiser D(x_ve, sigma_ve) is the Denoiser's x0 at t = t_from_ve_sigma(sigma_ve), fed
x_t = alpha x_ve. The probability-flow ODE is dx_ve / dsigma = (x_ve - D) / sigma, and
(x_ve - D) / sigma_ve is exactly the Denoiser's eps, which is what the solvers use.

Noise levels: `sigma_schedule="karras"` (default) is eq. 5 with rho = 7 between
sigma_min (default: sigma_ve at t = 1/T, the lowest trained level) and sigma_max
(default: min(80, sigma_ve at t = 1), EDM's sigma_max: a cosine schedule ends at 2e4 and a
zero-terminal-SNR one at 4096, and Heun-10 from there is 4x worse, or diverges, against
the exact ODE solution); values outside the trained range are clipped into it. For
DDPM's linear schedule (trained up to 157) diffusers' Karras grids start at the trained
maximum: pass sigma_max=grids.ve_sigma_range(schedule)[1] to match them. "timesteps" uses sigma_ve at the
discrete steps of `base.timesteps(T, N, spacing, steps_offset)`, or with
`fractional_timesteps` (linspace) at unrounded indices, as diffusers' Euler / Heun
schedulers place them (see `grids.ve_sigmas`). Either way a final step goes to
sigma = 0 (there the result is D itself). The start state x_T ~ N(0, I) is the VP state
at the first level, so x_ve = x_T / alpha there (init_noise="vp"); init_noise="sigma_max"
takes x_ve = sigma_max x_T instead, diffusers' init_noise_sigma for its linspace and
trailing spacings (its leading spacing is "vp").

  euler    N steps, NFE = N.
  heun     N steps, each Euler plus a trapezoidal correction, except the last (to
           sigma = 0) which is Euler: NFE = 2 N - 1.
  euler_a  Euler ancestral (k-diffusion's): each step goes down to sigma_down and adds
           noise sigma_up, sigma_up = min(s', eta s' sqrt(s^2 - s'^2) / s); eta = 1 is
           DDPM's ancestral step in VE form. NFE = N.

EDM stochastic churn (euler, heun; Algorithm 2): with gamma = min(S_churn / N,
sqrt(2) - 1) for sigma in [S_tmin, S_tmax], each step first raises the noise to
sigma_hat = sigma (1 + gamma) (capped at the schedule's maximum) by adding
sqrt(sigma_hat^2 - sigma^2) S_noise z, then steps from sigma_hat.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.denoiser import Denoiser
from diffusion.samplers import grids
from diffusion.samplers.base import SampleInputs
from diffusion.samplers.plan import Plan, run_plan


INIT_NOISES = ("vp", "sigma_max")


def _levels(schedule, num_steps, sigma_schedule, sigma_min, sigma_max, rho, spacing,
            strength, steps_offset=0, fractional_timesteps=False):
    sig = grids.ve_sigmas(schedule, num_steps, sigma_schedule, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho, spacing=spacing,
                          steps_offset=steps_offset,
                          fractional_timesteps=fractional_timesteps)
    if strength < 1.0:
        t = np.concatenate([grids.t_from_ve_sigma(schedule, sig[:-1]), [0.0]])
        sig = sig[t <= grids.truncate_for_strength(t, strength)[0]]
    return sig


def plan_karras(schedule, num_steps: int, *, heun: bool = False,
                ancestral_eta: float | None = None, sigma_schedule: str = "karras",
                sigma_min: float | None = None, sigma_max: float | None = None,
                rho: float = 7.0, spacing: str = "trailing", S_churn: float = 0.0,
                S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0,
                strength: float = 1.0, steps_offset: int = 0,
                fractional_timesteps: bool = False, init_noise: str = "vp"):
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn}, {S_noise}")
    if ancestral_eta is not None and ancestral_eta < 0:
        raise ValueError(f"ancestral eta must be >= 0, got {ancestral_eta}")
    if init_noise not in INIT_NOISES:
        raise ValueError(f"unknown init_noise {init_noise!r}; known: {INIT_NOISES}")
    if init_noise != "vp" and strength < 1.0:
        raise ValueError("image-to-image (strength < 1) starts from the VP state x_init "
                         "noised to t_start: it needs init_noise='vp'")
    sig = _levels(schedule, num_steps, sigma_schedule, sigma_min, sigma_max, rho, spacing,
                  strength, steps_offset, fractional_timesteps)
    top = grids.ve_sigma_range(schedule)[1]
    t_of = lambda s: float(grids.t_from_ve_sigma(schedule, s))
    a_of = lambda s: float(grids.alpha_from_ve_sigma(schedule, s))  # alpha at sigma_ve = s
    plan = Plan(t_start=t_of(sig[0]))
    if init_noise == "vp":
        x_ve = plan.start / a_of(sig[0])
    else:  # the state is start_std x_T (x_T on VP paths): x_ve = sigma_max x_T
        x_ve = (float(sig[0]) / float(schedule.host.start_std(t_of(sig[0])))) * plan.start
    for s, s_next in zip(sig[:-1], sig[1:]):
        s, s_next = float(s), float(s_next)
        churn = S_tmin <= s <= S_tmax
        gamma = min(S_churn / num_steps, math.sqrt(2.0) - 1.0) if churn else 0.0
        s_hat = min(s * (1.0 + gamma), top)
        if s_hat > s:
            x_ve = x_ve + (math.sqrt(s_hat ** 2 - s ** 2) * S_noise) * plan.noise()
        p = plan.evaluate(a_of(s_hat) * x_ve, t_of(s_hat))
        x_hat, d = p.x / a_of(s_hat), p.eps
        if ancestral_eta is not None:
            s_up = min(s_next, ancestral_eta * s_next * math.sqrt(s_hat ** 2 - s_next ** 2)
                       / s_hat)
            s_down = math.sqrt(s_next ** 2 - s_up ** 2)
            x_ve = x_hat + (s_down - s_hat) * d
            if s_next > 0 and s_up > 0:
                x_ve = x_ve + (s_up * S_noise) * plan.noise()
        elif heun and s_next > 0:
            d_next = plan.evaluate(a_of(s_next) * (x_hat + (s_next - s_hat) * d),
                                   t_of(s_next)).eps
            x_ve = x_hat + (0.5 * (s_next - s_hat)) * (d + d_next)
        else:
            x_ve = x_hat + (s_next - s_hat) * d
    return plan.compile(x_ve)  # sigma = 0: alpha = 1, x_ve is x0


def _sample(denoiser, key, shape, num_steps, *, y, guidance, x_T, sample_offset, x_init,
            strength, mask, callback, return_intermediates, **plan_options):
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    tables = plan_karras(denoiser.schedule, num_steps, strength=strength, **plan_options)
    return run_plan(tables, denoiser, key, shape, inputs, callback=callback,
                    return_intermediates=return_intermediates)


def sample_euler(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *, y=None,
                 guidance=None, x_T=None, sample_offset=0, x_init=None,
                 strength: float = 1.0, mask=None, callback=None,
                 return_intermediates: bool = False, sigma_schedule: str = "karras",
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 rho: float = 7.0, spacing: str = "trailing", S_churn: float = 0.0,
                 S_tmin: float = 0.0, S_tmax: float = math.inf,
                 S_noise: float = 1.0, steps_offset: int = 0,
                 fractional_timesteps: bool = False, init_noise: str = "vp") -> jnp.ndarray:
    return _sample(denoiser, key, shape, num_steps, y=y, guidance=guidance, x_T=x_T,
                   sample_offset=sample_offset, x_init=x_init, strength=strength, mask=mask,
                   callback=callback, return_intermediates=return_intermediates,
                   sigma_schedule=sigma_schedule, sigma_min=sigma_min, sigma_max=sigma_max,
                   rho=rho, spacing=spacing, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax,
                   S_noise=S_noise, steps_offset=steps_offset,
                   fractional_timesteps=fractional_timesteps, init_noise=init_noise)


def sample_heun(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *, y=None,
                guidance=None, x_T=None, sample_offset=0, x_init=None,
                strength: float = 1.0, mask=None, callback=None,
                return_intermediates: bool = False, sigma_schedule: str = "karras",
                sigma_min: float | None = None, sigma_max: float | None = None,
                rho: float = 7.0, spacing: str = "trailing", S_churn: float = 0.0,
                S_tmin: float = 0.0, S_tmax: float = math.inf,
                S_noise: float = 1.0, steps_offset: int = 0,
                fractional_timesteps: bool = False, init_noise: str = "vp") -> jnp.ndarray:
    return _sample(denoiser, key, shape, num_steps, y=y, guidance=guidance, x_T=x_T,
                   sample_offset=sample_offset, x_init=x_init, strength=strength, mask=mask,
                   callback=callback, return_intermediates=return_intermediates, heun=True,
                   sigma_schedule=sigma_schedule, sigma_min=sigma_min, sigma_max=sigma_max,
                   rho=rho, spacing=spacing, S_churn=S_churn, S_tmin=S_tmin, S_tmax=S_tmax,
                   S_noise=S_noise, steps_offset=steps_offset,
                   fractional_timesteps=fractional_timesteps, init_noise=init_noise)


def sample_euler_ancestral(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *,
                           y=None, guidance=None, x_T=None, sample_offset=0, x_init=None,
                           strength: float = 1.0, mask=None, callback=None,
                           return_intermediates: bool = False,
                           eta: float = 1.0, S_noise: float = 1.0,
                           sigma_schedule: str = "karras", sigma_min: float | None = None,
                           sigma_max: float | None = None, rho: float = 7.0,
                           spacing: str = "trailing", steps_offset: int = 0,
                           fractional_timesteps: bool = False,
                           init_noise: str = "vp") -> jnp.ndarray:
    return _sample(denoiser, key, shape, num_steps, y=y, guidance=guidance, x_T=x_T,
                   sample_offset=sample_offset, x_init=x_init, strength=strength, mask=mask,
                   callback=callback, return_intermediates=return_intermediates,
                   ancestral_eta=eta, S_noise=S_noise, sigma_schedule=sigma_schedule,
                   sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, spacing=spacing,
                   steps_offset=steps_offset, fractional_timesteps=fractional_timesteps,
                   init_noise=init_noise)
