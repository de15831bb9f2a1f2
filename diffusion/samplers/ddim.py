"""DDIM (Song et al. 2021): x_s = alpha_s x0 + sqrt(sigma_s^2 - sig^2) eps + sig z,
sig^2 = eta^2 sigma_s^2 / sigma_t^2 beta_{t|s} (on a VP table beta_{t|s} = 1 - ab_t / ab_s;
on any path, `paths.GaussianPath.transition`). eta = 0 is the deterministic
probability-flow sampler, which is Euler's method on the ODE in the path's natural
variables x / alpha and sigma / alpha, on every path; eta = 1 matches DDPM's small
variance. On a path with alpha(1) = 0 (flow) it starts at t = 1 too: it never divides
by alpha.

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
        # A VP table's sigma2 is -expm1(log ab): 1 - exp(.) in float32 loses 1.7e-4
        # (relative) at the first trained step of a linear schedule, ab = 1 - 1e-4.
        sigma2_s = sched.sigma2(sb)
        var = (eta ** 2) * sigma2_s / sched.sigma2(tb) * sched.transition(sb, tb)[1]
        dir_coef = jnp.sqrt(jnp.maximum(sigma2_s - var, 0.0))
        x = expand(sched.alpha(sb), x) * pred.x0 + expand(dir_coef, x) * pred.eps
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
