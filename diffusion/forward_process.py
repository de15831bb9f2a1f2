"""The forward (noising) process q and its posterior, in continuous time t in [0, 1].

Shapes: x0, x_t, eps are [B, ...]; t is [B]. Per-example scalars are broadcast over the
trailing axes with `expand`.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion.schedules import Schedule


def expand(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """[B] -> [B, 1, ..., 1] to broadcast against x."""
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray,
             eps: jnp.ndarray) -> jnp.ndarray:
    """x_t = alpha(t) x0 + sigma(t) eps: a sample of q(x_t | x0) (reparameterised)."""
    return expand(schedule.alpha(t), x0) * x0 + expand(schedule.sigma(t), x0) * eps


def q_step(schedule: Schedule, x_prev: jnp.ndarray, i: jnp.ndarray,
           eps: jnp.ndarray) -> jnp.ndarray:
    """One discrete step q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I)."""
    beta = jnp.asarray(schedule.betas, jnp.float32)[i]
    return expand(jnp.sqrt(1.0 - beta), x_prev) * x_prev + expand(jnp.sqrt(beta), x_prev) * eps


def posterior_coefficients(schedule: Schedule, s: jnp.ndarray, t: jnp.ndarray):
    """q(x_s | x_t, x0) = N(c_x0 x0 + c_xt x_t, var) for s < t.

    Returns (c_x0, c_xt, var), each shaped like t. With alpha_bar_{t|s} = ab_t / ab_s:
    var = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s).
    """
    log_ab_s, log_ab_t = schedule.log_alpha_bar(s), schedule.log_alpha_bar(t)
    # Every 1 - exp(.) is -expm1(.): near t = 0, alpha_bar is within 1e-4 of 1 and
    # 1 - exp(log_ab) in float32 keeps only ~3 significant digits of the difference.
    beta_ts = -jnp.expm1(log_ab_t - log_ab_s)  # 1 - ab_t / ab_s
    one_minus_ab_s = -jnp.expm1(log_ab_s)
    one_minus_ab_t = -jnp.expm1(log_ab_t)
    c_x0 = jnp.exp(0.5 * log_ab_s) * beta_ts / one_minus_ab_t
    c_xt = jnp.exp(0.5 * (log_ab_t - log_ab_s)) * one_minus_ab_s / one_minus_ab_t
    var = one_minus_ab_s / one_minus_ab_t * beta_ts
    return c_x0, c_xt, var


def posterior_mean_log_variance(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray,
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


def posterior_log_variance_clipped(schedule: Schedule, s: jnp.ndarray,
                                   t: jnp.ndarray) -> jnp.ndarray:
    """log var of q(x_s | x_t, x0), with the zero variance of the step to clean data
    replaced by that of the step from index 1 to 0 (DDPM's clipping)."""
    _, _, var = posterior_coefficients(schedule, s, t)
    _, _, var_1 = posterior_coefficients(schedule, schedule.t_of_index(0),
                                         schedule.t_of_index(1))
    return jnp.log(jnp.where(var <= 0.0, var_1, var))
