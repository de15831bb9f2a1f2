"""The forward (noising) process q and its posterior, in continuous time t in [0, 1],
on any Gaussian path (`diffusion.paths`; a VP `Schedule` is one).

Shapes: x0, x_t, eps are [B, ...]; t is [B]. Per-example scalars are broadcast over the
trailing axes with `expand`.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion.paths import GaussianPath


def expand(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """[B] -> [B, 1, ..., 1] to broadcast against x."""
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(schedule: GaussianPath, x0: jnp.ndarray, t: jnp.ndarray,
             eps: jnp.ndarray) -> jnp.ndarray:
    """x_t = alpha(t) x0 + sigma(t) eps: a sample of q(x_t | x0) (reparameterised)."""
    return expand(schedule.alpha(t), x0) * x0 + expand(schedule.sigma(t), x0) * eps


def q_step(schedule, x_prev: jnp.ndarray, i: jnp.ndarray,
           eps: jnp.ndarray) -> jnp.ndarray:
    """One discrete step q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I) of a
    discrete VP `Schedule`."""
    beta = jnp.asarray(schedule.betas, jnp.float32)[i]
    return expand(jnp.sqrt(1.0 - beta), x_prev) * x_prev + expand(jnp.sqrt(beta), x_prev) * eps


def posterior_coefficients(schedule: GaussianPath, s: jnp.ndarray, t: jnp.ndarray):
    """q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, var) for s < t.

    Returns (c_x0, c_xt, var), each shaped like t. With x_t | x_s = N(a x_s, beta) (the
    path's `transition`): c_x0 = alpha_s beta / sigma_t^2, c_xt = a sigma_s^2 / sigma_t^2,
    var = sigma_s^2 / sigma_t^2 beta; on a VP table beta = 1 - ab_t / ab_s and
    var = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s).
    """
    # A VP table forms every 1 - exp(.) as -expm1(.) (its sigma2 and transition): near
    # t = 0, alpha_bar is within 1e-4 of 1 and 1 - exp(log_ab) in float32 keeps only ~3
    # significant digits of the difference.
    a_ts, beta_ts = schedule.transition(s, t)
    sigma2_s, sigma2_t = schedule.sigma2(s), schedule.sigma2(t)
    c_x0 = schedule.alpha(s) * beta_ts / sigma2_t
    c_xt = a_ts * sigma2_s / sigma2_t
    var = sigma2_s / sigma2_t * beta_ts
    return c_x0, c_xt, var


def posterior_mean_log_variance(schedule: GaussianPath, x0: jnp.ndarray, x_t: jnp.ndarray,
                                s: jnp.ndarray, t: jnp.ndarray, clip_first: bool = True):
    """Mean and log variance of q(x_s | x_t, x0).

    The variance is 0 at s = 0 (the last step to clean data); with `clip_first` its log is
    taken from the first step's successor instead, as DDPM does, so it stays finite.
    """
    c_x0, c_xt, var = posterior_coefficients(schedule, s, t)
    mean = expand(c_x0, x0) * x0 + expand(c_xt, x_t) * x_t
    if clip_first:
        return mean, posterior_log_variance_clipped(schedule, s, t)
    return mean, jnp.log(jnp.maximum(var, 1e-20))


def posterior_log_variance_clipped(schedule: GaussianPath, s: jnp.ndarray,
                                   t: jnp.ndarray) -> jnp.ndarray:
    """log var of q(x_s | x_t, x0), with the zero variance of the step to clean data
    replaced by that of the step from index 1 to 0 (DDPM's clipping; on a continuous
    path from 2 t_min to t_min)."""
    _, _, var = posterior_coefficients(schedule, s, t)
    t1 = jnp.float32(schedule.t_min)
    _, _, var_1 = posterior_coefficients(schedule, t1, 2.0 * t1)
    return jnp.log(jnp.where(var <= 0.0, var_1, var))
