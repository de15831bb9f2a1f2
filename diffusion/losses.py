"""Diffusion training objective: time sampling, target MSE and loss weightings.

Every weighting is stated as a weight w(snr) on the x0-space error ||x0 - x0_hat||^2
and converted to the chosen target: an MSE on eps carries an implicit x0-weight of snr,
on x0 of 1, and on v of snr + 1. So "snr" on an eps model is DDPM's simple loss, and
min-SNR-gamma (Hang et al. 2023) means the same thing whatever the model predicts.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion import targets
from diffusion.forward_process import expand, q_sample
from diffusion.learned_variance import vlb_term
from diffusion.schedules import Schedule

WEIGHTINGS = ("simple", "snr", "min_snr", "truncated_snr")
TIME_SAMPLINGS = ("uniform", "antithetic", "low_discrepancy")


def _implicit_x0_weight(pred_type: str, snr: jnp.ndarray) -> jnp.ndarray:
    return {"eps": snr, "x0": jnp.ones_like(snr), "v": snr + 1.0}[pred_type]


def loss_weight(weighting: str, pred_type: str, logsnr: jnp.ndarray,
                gamma: float = 5.0) -> jnp.ndarray:
    """Per-example factor multiplying the MSE on `pred_type`'s target."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; known: {WEIGHTINGS}")
    targets.check_pred_type(pred_type)
    if weighting == "simple":
        return jnp.ones_like(logsnr)
    snr = jnp.exp(logsnr)
    w_x0 = {"snr": snr, "min_snr": jnp.minimum(snr, gamma),
            "truncated_snr": jnp.maximum(snr, 1.0)}[weighting]
    return w_x0 / _implicit_x0_weight(pred_type, snr)


def sample_time(key: jax.Array, batch: int, schedule: Schedule, method: str = "uniform",
                discrete: bool = True) -> jnp.ndarray:
    """Training times t [B] in (0, 1]; on the discrete grid (i + 1) / T if `discrete`.

    "antithetic" pairs u with 1 - u; "low_discrepancy" spreads one shared uniform over
    the batch, u_b = (u + b / B) mod 1 (Kingma et al. 2021). Both lower the variance of
    the batch loss without changing its expectation.
    """
    if method == "uniform":
        u = jax.random.uniform(key, (batch,))
    elif method == "antithetic":
        half = jax.random.uniform(key, ((batch + 1) // 2,))
        u = jnp.concatenate([half, 1.0 - half])[:batch]
    elif method == "low_discrepancy":
        u = jnp.mod(jax.random.uniform(key, ()) + jnp.arange(batch) / batch, 1.0)
    else:
        raise ValueError(f"unknown time sampling {method!r}; known: {TIME_SAMPLINGS}")
    if discrete:
        i = jnp.minimum(jnp.floor(u * schedule.T), schedule.T - 1)
        return schedule.t_of_index(i)
    # Continuous: map [0, 1) to (0, 1], avoiding t = 0 where eps is undefined.
    return 1.0 - u


def diffusion_loss(net_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                   schedule: Schedule, x0: jnp.ndarray, key: jax.Array, *,
                   pred_type: str = "eps", weighting: str = "simple",
                   min_snr_gamma: float = 5.0, time_sampling: str = "uniform",
                   discrete_time: bool = True, learned_sigma: bool = False,
                   vlb_weight: float = 0.001):
    """Per-example losses [B] and times t [B].

    net_fn(x_t, c_noise) -> prediction of `pred_type` [B, H, W, C]; with `learned_sigma`
    [B, H, W, 2C], the second half being the variance output trained by the VLB with the
    mean held fixed (iDDPM's hybrid loss, lambda = vlb_weight), from the unclipped x0
    prediction. At the first step the VLB is the 8-bit decoder NLL (see
    learned_variance.vlb_term).
    """
    if learned_sigma and not discrete_time:
        raise ValueError("learned_sigma needs discrete_time=True (the VLB is per step)")
    key_t, key_eps = jax.random.split(key)
    t = sample_time(key_t, x0.shape[0], schedule, time_sampling, discrete_time)
    eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    x_t = q_sample(schedule, x0, t, eps)
    out = net_fn(x_t, schedule.c_noise(t)).astype(jnp.float32)
    pred, v = jnp.split(out, 2, axis=-1) if learned_sigma else (out, None)
    alpha, sigma = expand(schedule.alpha(t), x0), expand(schedule.sigma(t), x0)
    tgt = targets.target(pred_type, x0, eps, alpha, sigma)
    mse = jnp.mean(jnp.square(pred - tgt), axis=tuple(range(1, x0.ndim)))
    loss = loss_weight(weighting, pred_type, schedule.logsnr(t), min_snr_gamma) * mse
    if learned_sigma:
        # No clipping of x0 here: the VLB scores the model's own reverse step, as
        # iDDPM and DiT train it (clip_denoised=False). Clipping is a sampling choice; in
        # training it charges an exact model for every |x0| > 1 (hundreds of bits/dim
        # at the first steps on unit-variance latents).
        x0_pred, _ = targets.to_x0_eps(pred_type, jax.lax.stop_gradient(pred), x_t,
                                       alpha, sigma)
        loss = loss + vlb_weight * schedule.T * vlb_term(schedule, x0, x_t, t, x0_pred, v)
    return loss, t


def bucket_means(values: jnp.ndarray, t: jnp.ndarray, num_buckets: int = 4) -> jnp.ndarray:
    """Mean of `values` [B] in equal-width buckets of t in (0, 1]; NaN-free (empty -> 0)."""
    idx = jnp.clip(jnp.ceil(t * num_buckets).astype(jnp.int32) - 1, 0, num_buckets - 1)
    one_hot = jax.nn.one_hot(idx, num_buckets)
    sums = one_hot.T @ values
    counts = one_hot.sum(0)
    return sums / jnp.maximum(counts, 1.0)
