"""DDIM (Song et al. 2021): x_s = alpha_s x0 + sqrt(1 - ab_s - sig^2) eps + sig z,
sig = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). eta = 0 is the
deterministic probability-flow sampler; eta = 1 matches DDPM's small variance.

Grid (`base.step_times`): `spacing`, and diffusers' DDIMScheduler conventions as
options: `steps_offset` (leading spacing), `set_alpha_to_one=False` (the last step ends
at the first trained step's alpha_bar instead of 1: Stable Diffusion's setting) and
`prev_timestep="stride"` (each step ends T // N indices lower, whatever the grid).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.denoiser import Denoiser
from diffusion.forward_process import expand
from diffusion.samplers.base import (SampleInputs, paste_final, paste_known,
                                     per_sample_normal, renoise, report, run_steps,
                                     sample_keys, start_from, time_pairs)


def sample(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *, y=None,
           guidance=None, x_T=None, sample_offset=0, x_init=None, strength: float = 1.0,
           mask=None, callback=None, return_intermediates: bool = False,
           eta: float = 0.0, spacing: str = "trailing", steps_offset: int = 0,
           set_alpha_to_one: bool = True, prev_timestep: str = "next",
           inpaint_resample: int = 0) -> jnp.ndarray:
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    if inpaint_resample and mask is None:
        raise ValueError(f"inpaint_resample={inpaint_resample} needs an inpainting mask")
    sched = denoiser.schedule
    t_all, s_all = time_pairs(sched, num_steps, spacing, strength, steps_offset=steps_offset,
                              set_alpha_to_one=set_alpha_to_one, prev_timestep=prev_timestep)
    keys = sample_keys(key, shape[0], sample_offset)
    x = start_from(sched, keys, shape, inputs, t_all[0])
    b = shape[0]

    def update(x, k, t, s):
        tb, sb = jnp.full((b,), t), jnp.full((b,), s)
        x = paste_known(sched, x, t, inputs, keys, k)
        pred = denoiser.predict(x, tb, y, guidance)
        report(callback, k, t, x, pred.x0)
        x_t, x0 = x, pred.x0
        log_ab_t, log_ab_s = sched.log_alpha_bar(tb), sched.log_alpha_bar(sb)
        # 1 - ab as -expm1(log ab): 1 - exp(.) in float32 loses 1.7e-4 (relative) at the
        # first trained step of a linear schedule, where ab = 1 - 1e-4.
        one_minus_ab_s = -jnp.expm1(log_ab_s)
        var = (eta ** 2) * one_minus_ab_s / -jnp.expm1(log_ab_t) * -jnp.expm1(log_ab_t - log_ab_s)
        dir_coef = jnp.sqrt(jnp.maximum(one_minus_ab_s - var, 0.0))
        x = expand(jnp.exp(0.5 * log_ab_s), x) * pred.x0 + expand(dir_coef, x) * pred.eps
        if eta > 0:
            noise = per_sample_normal(keys, tuple(shape[1:]), k + 1)
            x = x + expand(jnp.sqrt(var), x) * noise
        return x, (x_t, x0)

    x, path = run_steps(update, x, t_all, s_all, resample=inpaint_resample,
                        jump_back=lambda x, s, t, k: renoise(sched, x, s, t, keys, k),
                        return_intermediates=return_intermediates)
    x = paste_final(x, inputs)
    return (x, path) if return_intermediates else x


def num_evals(schedule, num_steps: int, *, strength: float = 1.0, eta: float = 0.0,
              spacing: str = "trailing", inpaint_resample: int = 0, **grid) -> int:
    """Network evaluations of `sample` with these options (one a step kept, times
    1 + inpaint_resample)."""
    del eta
    steps = int(time_pairs(schedule, num_steps, spacing, strength, **grid)[0].shape[0])
    return steps * (1 + int(inpaint_resample))
