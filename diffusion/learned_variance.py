"""Learned reverse-process variance (Nichol & Dhariwal 2021, used by DiT).

The network outputs, next to its mean prediction, v in [-1, 1] per pixel; the reverse
step's log variance interpolates between the two DDPM bounds,
log var = frac * log(beta_t) + (1 - frac) * log(posterior_var), frac = (v + 1) / 2,
where beta_t = 1 - alpha_bar_t / alpha_bar_s for the step s < t. It is trained with the
variational bound (the "hybrid" loss: L_simple + lambda * L_vlb, with the mean held
fixed in L_vlb by a stop-gradient).
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from diffusion.forward_process import (expand, posterior_log_variance_clipped,
                                       posterior_mean_log_variance)
from diffusion.schedules import Schedule


def interpolated_log_variance(schedule: Schedule, v: jnp.ndarray, s: jnp.ndarray,
                              t: jnp.ndarray) -> jnp.ndarray:
    """Model log variance of p(x_s | x_t) from the raw variance output v [B, ...]."""
    log_beta = jnp.log(-jnp.expm1(schedule.log_alpha_bar(t) - schedule.log_alpha_bar(s)))
    log_post = posterior_log_variance_clipped(schedule, s, t)
    frac = (v + 1.0) / 2.0
    return frac * expand(log_beta, v) + (1.0 - frac) * expand(log_post, v)


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x0, mean, log_scale) -> jnp.ndarray:
    """log p(x0) for 8-bit data in [-1, 1] under a Gaussian discretised into 256 bins."""
    centered = x0 - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x0 < -0.999, log_cdf_plus,
                     jnp.where(x0 > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray,
             x0_pred: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """Per-example VLB term [B] in bits/dim for discrete t = (i + 1) / T.

    KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)) for i > 0 and the decoder's negative
    log-likelihood for i = 0. Pass x0_pred under stop_gradient to train only the variance,
    and unclipped: the KL of an exact model is then 0 at every step, whatever the data's
    range.

    The decoder at i = 0 is iDDPM's discretised Gaussian over 256 bins of [-1, 1], which
    is a likelihood only for 8-bit pixels. On latents (continuous, not confined to
    [-1, 1]) DiT uses it all the same and so do we: values beyond +-1 fall in the edge
    bins, so the term stays finite and bounded, and its only effect in training is on
    the variance output at the one step i = 0 (the mean is held fixed). Its value is not
    a latent likelihood: do not report it as bits/dim of latent data.
    """
    s = t - 1.0 / schedule.T
    true_mean, true_logvar = posterior_mean_log_variance(schedule, x0, x_t, s, t)
    model_mean, _ = posterior_mean_log_variance(schedule, x0_pred, x_t, s, t)
    model_logvar = interpolated_log_variance(schedule, v, s, t)
    axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(normal_kl(true_mean, expand(true_logvar, x0), model_mean, model_logvar),
                  axis=axes) / math.log(2.0)
    nll = -jnp.mean(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar),
                    axis=axes) / math.log(2.0)
    first = t <= 1.0 / schedule.T + 1e-6
    return jnp.where(first, nll, kl)
