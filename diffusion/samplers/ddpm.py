"""DDPM ancestral sampling (Ho et al. 2020), on any subset of the training steps.

It runs on every Gaussian path (`diffusion.paths`): the forward process of any path
whose SNR decreases is Markov, x_t | x_s = N(a x_s, beta_{t|s} I) (the path's
`transition`), so the posterior q(x_s | x_t, x0) exists on VP, VE and flow paths alike
(on the flow path from t = 1, where alpha = 0, too). "learned" needs a VP table.

Each step draws x_s ~ N(mean, var) with the posterior mean of q(x_s | x_t, x0_hat) and
var = the posterior variance ("small", DDPM's fixed small), beta_{t|s} = 1 - ab_t / ab_s
("large", fixed large, with the first step's clipped), or the model's learned
interpolation between the two ("learned"). With fewer steps than T this is the respaced
chain of Nichol & Dhariwal (2021).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion.denoiser import Denoiser
from diffusion.forward_process import (expand, posterior_log_variance_clipped,
                                       posterior_mean_log_variance)
from diffusion.learned_variance import interpolated_log_variance
from diffusion.samplers.base import (SampleInputs, paste_final, paste_known,
                                     per_sample_normal, renoise, report, run_steps,
                                     sample_keys, start_from, time_pairs)

VARIANCES = ("small", "large", "learned")


def sample(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *, y=None,
           guidance=None, x_T=None, sample_offset=0, x_init=None, strength: float = 1.0,
           mask=None, callback=None, return_intermediates: bool = False,
           variance: str = "small", spacing: str = "trailing",
           inpaint_resample: int = 0) -> jnp.ndarray:
    if variance not in VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; known: {VARIANCES}")
    if variance == "learned" and not denoiser.learned_sigma:
        raise ValueError("variance='learned' needs a model trained with learned sigma")
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    if inpaint_resample and mask is None:
        raise ValueError(f"inpaint_resample={inpaint_resample} needs an inpainting mask")
    sched = denoiser.schedule
    t_all, s_all = time_pairs(sched, num_steps, spacing, strength)
    keys = sample_keys(key, shape[0], sample_offset)
    x = start_from(sched, keys, shape, inputs, t_all[0])
    b = shape[0]

    def update(x, k, t, s):
        tb, sb = jnp.full((b,), t), jnp.full((b,), s)
        x = paste_known(sched, x, t, inputs, keys, k)
        pred = denoiser.predict(x, tb, y, guidance)
        report(callback, k, t, x, pred.x0)
        out = (x, pred.x0)
        mean, log_var = posterior_mean_log_variance(sched, pred.x0, x, sb, tb)
        if variance == "learned":
            log_var = interpolated_log_variance(sched, pred.var_out, sb, tb)
        else:
            if variance == "large":
                beta = sched.transition(sb, tb)[1]
                # DDPM's fixed-large variance replaces the last step's beta by the
                # clipped posterior variance, as the first posterior variance is 0.
                last = sb <= 0.0
                log_var = jnp.where(last, posterior_log_variance_clipped(sched, sb, tb),
                                    jnp.log(beta))
            log_var = expand(log_var, x)
        noise = per_sample_normal(keys, tuple(shape[1:]), k + 1)
        nonzero = (s > 0.0).astype(x.dtype)
        return mean + nonzero * jnp.exp(0.5 * log_var) * noise, out

    x, path = run_steps(update, x, t_all, s_all, resample=inpaint_resample,
                        jump_back=lambda x, s, t, k: renoise(sched, x, s, t, keys, k),
                        return_intermediates=return_intermediates)
    x = paste_final(x, inputs)
    return (x, path) if return_intermediates else x


def num_evals(schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "trailing",
              variance: str = "small", inpaint_resample: int = 0) -> int:
    """Network evaluations of `sample` with these options (one a step kept, times
    1 + inpaint_resample)."""
    del variance
    steps = int(time_pairs(schedule, num_steps, spacing, strength)[0].shape[0])
    return steps * (1 + int(inpaint_resample))
