"""PLMS / PNDM (Liu et al. 2022): linear multistep on eps with DDIM's transfer.

On DDIM's grid (`base.timesteps(T, N, spacing)`, last step to t = 0), every step moves
x with the deterministic DDIM map phi(x, e, t, s) = alpha_s (x - sigma_t e) / alpha_t
+ sigma_s e, and replaces the model's eps by a combination e' of recent ones. Once four
are known e' is 4th-order Adams-Bashforth, (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24.
The first steps lack history; `warmup` chooses how they start:

  "pseudo_euler"  (default; Latent Diffusion's PLMS) the first step is pseudo improved
                  Euler, e' = (e(x, t) + e(phi(x, e, t, s), s)) / 2, then AB2 and AB3:
                  NFE = N + 1.
  "prk"           (PNDM) the first three steps are pseudo 4th-order Runge-Kutta with
                  four evaluations each (two at the midpoint (t + s) / 2):
                  NFE = N + 3 min(3, N - 1).
  "lower_order"   AB1, AB2, AB3 and then AB4: NFE = N.

On a path with alpha(1) = 0 (flow) the grid's t = 1 moves to t_max = 1 - 1/T, since
the transfer divides by alpha_t.

A warm-up step whose end is t = 0 falls back to Adams-Bashforth (the model is never
evaluated at t = 0, where sigma = 0), which the NFE counts above include.

Caution, schedules with alpha(1) ~ 0 (cosine: 5e-5; zero terminal SNR): the step from
t = 1 multiplies x - sigma_t e' by alpha_s / alpha_t (~2,000 for cosine at 10 steps), so
an e' that is not the model's own eps at (x, t), as the pseudo-Euler and PRK warm-ups
make it, is amplified by that factor. Measured on the default Fashion-MNIST model
(cosine, trailing spacing): FID in the millions with "pseudo_euler"; use "lower_order"
(whose first step is DDIM's) or leading spacing there
(experiments/sampler_benchmark/fashion_mnist).

diffusers' PNDMScheduler is warmup="pseudo_euler" (skip_prk_steps=True, Stable
Diffusion's setting) or "prk" (skip_prk_steps=False), with its grid conventions as
options (`base.step_times`): steps_offset, set_alpha_to_one, prev_timestep="stride".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.denoiser import Denoiser
from diffusion.samplers import grids
from diffusion.samplers.base import SampleInputs, step_times
from diffusion.samplers.plan import Form, Plan, run_plan

WARMUPS = ("pseudo_euler", "prk", "lower_order")
# Adams-Bashforth weights of e_0 (newest), e_1, ... by order.
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plan_plms(schedule, num_steps: int, *, spacing: str = "trailing",
              warmup: str = "pseudo_euler", strength: float = 1.0, steps_offset: int = 0,
              set_alpha_to_one: bool = True, prev_timestep: str = "next"):
    if warmup not in WARMUPS:
        raise ValueError(f"unknown PLMS warmup {warmup!r}; known: {WARMUPS}")
    t_all, s_all = step_times(schedule, num_steps, spacing, steps_offset=steps_offset,
                              set_alpha_to_one=set_alpha_to_one, prev_timestep=prev_timestep)
    # The transfer divides by alpha_t: on a flow path (alpha(1) = 0) start at t_max.
    t_all, s_all = grids.clip_to_path(schedule, t_all), grids.clip_to_path(schedule, s_all)
    keep = grids.truncate_for_strength(np.concatenate([t_all, [0.0]]), strength)[:-1]
    pairs = list(zip(t_all[-len(keep):], s_all[-len(keep):]))
    coef = lambda t: (float(grids.alpha(schedule, t)), float(grids.sigma(schedule, t)))

    def phi(x: Form, e: Form, t: float, s: float) -> Form:
        (a_t, sig_t), (a_s, sig_s) = coef(t), coef(s)
        return (a_s / a_t) * x + (sig_s - a_s * sig_t / a_t) * e

    plan = Plan(t_start=pairs[0][0])
    x, history = plan.start, []
    for t, s in pairs:
        t, s = float(t), float(s)
        p = plan.evaluate(x, t)
        x, e = p.x, p.eps
        n = len(history)
        if warmup == "pseudo_euler" and n == 0 and s > 0:
            e_prime = 0.5 * (e + plan.evaluate(phi(x, e, t, s), s).eps)
        elif warmup == "prk" and n < 3 and s > 0:
            mid = 0.5 * (t + s)
            e2 = plan.evaluate(phi(x, e, t, mid), mid).eps
            e3 = plan.evaluate(phi(x, e2, t, mid), mid).eps
            e4 = plan.evaluate(phi(x, e3, t, s), s).eps
            e_prime = (1.0 / 6.0) * (e + 2.0 * e2 + 2.0 * e3 + e4)
        else:
            recent = [e] + history[::-1][:3]
            e_prime = sum((w * ei for w, ei in zip(_AB[len(recent)], recent)), Form({}))
        history.append(e)
        x = phi(x, e_prime, t, s)
    return plan.compile(x)


def sample(denoiser: Denoiser, key: jax.Array, shape: tuple, num_steps: int, *, y=None,
           guidance=None, x_T=None, sample_offset=0, x_init=None, strength: float = 1.0,
           mask=None, callback=None, return_intermediates: bool = False,
           spacing: str = "trailing", warmup: str = "pseudo_euler", steps_offset: int = 0,
           set_alpha_to_one: bool = True, prev_timestep: str = "next") -> jnp.ndarray:
    inputs = SampleInputs(y, guidance, x_T, sample_offset, x_init, strength, mask)
    inputs.check(shape)
    tables = plan_plms(denoiser.schedule, num_steps, spacing=spacing, warmup=warmup,
                       strength=strength, steps_offset=steps_offset,
                       set_alpha_to_one=set_alpha_to_one, prev_timestep=prev_timestep)
    return run_plan(tables, denoiser, key, shape, inputs, callback=callback,
                    return_intermediates=return_intermediates)
