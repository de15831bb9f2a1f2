"""DDIM (Song et al. 2021): x_s = alpha_s x0 + sqrt(1 - ab_s - sig^2) eps + sig z,
sig = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). eta = 0 is the
deterministic probability-flow sampler; eta = 1 matches DDPM's small variance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.denoiser import Denoiser
from diffusion.forward_process import expand
from diffusion.samplers.base import (check_img2img, per_sample_normal, sample_keys,
                                     start_state, time_pairs)


def sample(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *, y=None,
           guidance=None, x_T=None, sample_offset=0, x_init=None, strength: float = 1.0, eta: float = 0.0,
           spacing: str = "trailing") -> jnp.ndarray:
    check_img2img(shape, x_T, x_init, strength)
    sched = denoiser.schedule
    t_all, s_all = time_pairs(sched, num_steps, spacing, strength)
    keys = sample_keys(key, shape[0], sample_offset)
    x = start_state(sched, keys, shape, x_T, x_init, t_all[0])
    b = shape[0]

    def step(x, inp):
        k, t, s = inp
        tb, sb = jnp.full((b,), t), jnp.full((b,), s)
        pred = denoiser.predict(x, tb, y, guidance)
        log_ab_t, log_ab_s = sched.log_alpha_bar(tb), sched.log_alpha_bar(sb)
        ab_s = jnp.exp(log_ab_s)
        var = (eta ** 2) * (1.0 - ab_s) / -jnp.expm1(log_ab_t) * -jnp.expm1(log_ab_t - log_ab_s)
        dir_coef = jnp.sqrt(jnp.maximum(1.0 - ab_s - var, 0.0))
        x = expand(jnp.sqrt(ab_s), x) * pred.x0 + expand(dir_coef, x) * pred.eps
        if eta > 0:
            noise = per_sample_normal(keys, tuple(shape[1:]), k + 1)
            x = x + expand(jnp.sqrt(var), x) * noise
        return x, None

    steps = jnp.arange(t_all.shape[0], dtype=jnp.uint32)
    x, _ = jax.lax.scan(step, x, (steps, t_all, s_all))
    return x
