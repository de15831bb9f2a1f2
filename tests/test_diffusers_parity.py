"""Our samplers against diffusers' schedulers, row by row of diffusion/samplers/README.md.

Data N(MU, S^2) per dimension (a different mean and std in each of 4 dims): its exact eps
predictor is closed form, eps(x_t) = (x_t - a x0_hat) / sigma with x0_hat = MU + a S^2
(x_t - a MU) / (a^2 S^2 + sigma^2). diffusers' scheduler loop runs it in float64 (torch)
at the noise level the scheduler itself assumes at each call (its alphas_cumprod at the
timestep, or its sigma for the sigma-based schedulers, so fractional and Karras levels
are exact too); our sampler runs it in float32 at the level of its own continuous time,
from the same x_T, on a Schedule built from diffusers' alphas_cumprod (they agree with
make_schedule's to float32 rounding, checked below). A row passes when the two results
agree to 1e-5 relative (max abs difference / max abs value), at 10, 20 and 50 steps, for
the linear (DDPM) and scaled_linear (Stable Diffusion) schedules.

diffusers is a test requirement (requirements-test.txt): a missing install fails here.
One jit compile per (row, schedule, steps) is the cost; shapes are [1, 2, 2, 1].
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, PNDMScheduler)
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from diffusion.denoiser import Denoiser
from diffusion.samplers import get_sampler, grids
from diffusion.samplers.base import per_sample_normal, sample_keys
from diffusion.schedules import Schedule, make_schedule

SHAPE = (1, 2, 2, 1)
MU = np.array([0.5, -0.3, 1.0, 0.2]).reshape(SHAPE)
S = np.array([0.6, 0.3, 1.2, 0.8]).reshape(SHAPE)
X_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
BETAS = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
         "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085,
                               beta_end=0.012)}
TRAINED_MAX = "trained max"  # placeholder: sigma_ve at the last trained step




def exact_eps_np(x: np.ndarray, ab: float) -> np.ndarray:
    a, var = np.sqrt(ab), 1.0 - ab
    x0 = MU + a * S ** 2 * (x - a * MU) / (a * a * S ** 2 + var)
    return (x - a * x0) / np.sqrt(var)


def exact_denoiser(schedule: Schedule) -> Denoiser:
    mu, s2 = jnp.asarray(MU, jnp.float32), jnp.asarray(S ** 2, jnp.float32)

    def net(x, c_noise, y):
        log_ab = schedule.log_alpha_bar((c_noise + 1.0) / schedule.T)[:, None, None, None]
        a, var = jnp.exp(0.5 * log_ab), -jnp.expm1(log_ab)
        x0 = mu + a * s2 * (x - a * mu) / (a * a * s2 + var)
        return (x - a * x0) / jnp.sqrt(var)
    return Denoiser(net, schedule, pred_type="eps")


# (id, diffusers scheduler, its config, our sampler, our options). Options equal to
# TRAINED_MAX are filled in with the schedule's sigma_ve at t = 1.
# DDIMScheduler clips x0 to [-1, 1] by default (clip_sample): Stable Diffusion turns it
# off, and so does `make_scheduler` (ours: Denoiser(clip_x0=1.0) for the clipped form).
ROWS = [
    ("ddim_sd", DDIMScheduler, dict(timestep_spacing="leading", steps_offset=1,
                                    set_alpha_to_one=False),
     "ddim", dict(spacing="leading", steps_offset=1, set_alpha_to_one=False)),
    ("ddim_leading", DDIMScheduler, dict(timestep_spacing="leading", set_alpha_to_one=True),
     "ddim", dict(spacing="leading")),
    ("ddim_trailing", DDIMScheduler, dict(timestep_spacing="trailing", set_alpha_to_one=False),
     "ddim", dict(spacing="trailing", set_alpha_to_one=False)),
    ("ddim_linspace", DDIMScheduler, dict(timestep_spacing="linspace", set_alpha_to_one=True),
     "ddim", dict(spacing="linspace", prev_timestep="stride")),
    ("pndm_sd", PNDMScheduler, dict(skip_prk_steps=True, steps_offset=1,
                                    set_alpha_to_one=False),
     "plms", dict(spacing="leading", steps_offset=1, set_alpha_to_one=False)),
    ("pndm_prk", PNDMScheduler, dict(skip_prk_steps=False, steps_offset=1,
                                     set_alpha_to_one=False),
     "plms", dict(warmup="prk", spacing="leading", steps_offset=1, set_alpha_to_one=False)),
    ("dpmpp_2m_leading", DPMSolverMultistepScheduler, dict(timestep_spacing="leading",
                                                           steps_offset=1),
     "dpmpp_2m", dict(skip_type="leading", steps_offset=1, final_step="zero",
                      lower_order_final_below=15)),
    ("dpmpp_2m_trailing", DPMSolverMultistepScheduler, dict(timestep_spacing="trailing"),
     "dpmpp_2m", dict(skip_type="trailing", final_step="zero", lower_order_final_below=15)),
    ("dpmpp_2m_linspace", DPMSolverMultistepScheduler, dict(timestep_spacing="linspace"),
     "dpmpp_2m", dict(skip_type="linspace", final_step="zero", lower_order_final_below=15)),
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True),
     "dpmpp_2m", dict(skip_type="karras", sigma_max=TRAINED_MAX, final_step="zero",
                      lower_order_final_below=15)),
    ("dpmpp_2m_sigma_min", DPMSolverMultistepScheduler, dict(timestep_spacing="trailing",
                                                             final_sigmas_type="sigma_min"),
     "dpmpp_2m", dict(skip_type="trailing", final_step="sigma_min",
                      lower_order_final_below=15)),
    ("dpmpp_3m_leading", DPMSolverMultistepScheduler, dict(solver_order=3, steps_offset=1,
                                                           timestep_spacing="leading"),
     "dpmpp_3m", dict(skip_type="leading", steps_offset=1, final_step="zero",
                      lower_order_final_below=15, dpmpp3m_coef="diffusers")),
    ("dpmpp_3m_trailing", DPMSolverMultistepScheduler, dict(solver_order=3,
                                                            timestep_spacing="trailing"),
     "dpmpp_3m", dict(skip_type="trailing", final_step="zero", lower_order_final_below=15,
                      dpmpp3m_coef="diffusers")),
    ("dpmpp_3m_karras", DPMSolverMultistepScheduler, dict(solver_order=3,
                                                          use_karras_sigmas=True),
     "dpmpp_3m", dict(skip_type="karras", sigma_max=TRAINED_MAX, final_step="zero",
                      lower_order_final_below=15, dpmpp3m_coef="diffusers")),
    ("euler_sd", EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1),
     "euler", dict(sigma_schedule="timesteps", spacing="leading", steps_offset=1)),
    ("euler_linspace", EulerDiscreteScheduler, dict(timestep_spacing="linspace"),
     "euler", dict(sigma_schedule="timesteps", spacing="linspace", fractional_timesteps=True,
                   init_noise="sigma_max")),
    ("euler_trailing", EulerDiscreteScheduler, dict(timestep_spacing="trailing"),
     "euler", dict(sigma_schedule="timesteps", spacing="trailing", init_noise="sigma_max")),
    ("euler_karras", EulerDiscreteScheduler, dict(timestep_spacing="linspace",
                                                  use_karras_sigmas=True),
     "euler", dict(sigma_schedule="karras", sigma_max=TRAINED_MAX, init_noise="sigma_max")),
    ("heun_sd", HeunDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1),
     "heun", dict(sigma_schedule="timesteps", spacing="leading", steps_offset=1)),
    ("heun_linspace", HeunDiscreteScheduler, dict(timestep_spacing="linspace"),
     "heun", dict(sigma_schedule="timesteps", spacing="linspace", fractional_timesteps=True,
                  init_noise="sigma_max")),
    ("heun_karras", HeunDiscreteScheduler, dict(timestep_spacing="linspace",
                                                use_karras_sigmas=True),
     "heun", dict(sigma_schedule="karras", sigma_max=TRAINED_MAX, init_noise="sigma_max")),
]
_SCHEDULES: dict = {}


def schedule_from_diffusers(betas: str) -> Schedule:
    """Our Schedule over diffusers' own (float32) alphas_cumprod."""
    if betas not in _SCHEDULES:
        ac = DDIMScheduler(num_train_timesteps=1000, **BETAS[betas]).alphas_cumprod
        _SCHEDULES[betas] = Schedule(f"diffusers_{betas}", ac.double().numpy())
    return _SCHEDULES[betas]


def make_scheduler(cls, betas: str, config: dict):
    extra = dict(clip_sample=False) if cls is DDIMScheduler else {}
    return cls(num_train_timesteps=1000, **BETAS[betas], **extra, **config)


def run_diffusers(scheduler, num_steps: int) -> np.ndarray:
    """diffusers' sampling loop with the exact model, as its pipelines run it."""
    scheduler.set_timesteps(num_steps)
    ac = scheduler.alphas_cumprod.double().numpy()
    sigma_based = isinstance(scheduler, (EulerDiscreteScheduler, HeunDiscreteScheduler,
                                         EulerAncestralDiscreteScheduler))
    x = torch.from_numpy(X_T.astype(np.float64))
    if sigma_based:
        x = x * float(scheduler.init_noise_sigma)
    for i, t in enumerate(scheduler.timesteps):
        x_in = x
        if sigma_based:
            x_in = scheduler.scale_model_input(x, t)
            sigma = float(scheduler.sigmas[scheduler.step_index])
            ab = 1.0 / (1.0 + sigma * sigma)
        elif isinstance(scheduler, DPMSolverMultistepScheduler):
            sigma = float(scheduler.sigmas[i])
            ab = 1.0 / (1.0 + sigma * sigma)
        else:
            ab = float(ac[int(t)])
        eps = torch.from_numpy(exact_eps_np(x_in.numpy(), ab))
        x = scheduler.step(eps, t, x).prev_sample
    return x.double().numpy()


@pytest.mark.parametrize("num_steps", [10, 20, 50])
@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_sampler_matches_diffusers(row, betas, num_steps):
    _, cls, config, name, options = row
    schedule = schedule_from_diffusers(betas)
    theirs = run_diffusers(make_scheduler(cls, betas, config), num_steps)
    top = grids.ve_sigma_range(schedule)[1]
    options = {k: top if v is TRAINED_MAX else v for k, v in options.items()}
    sample = get_sampler(name)
    ours = jax.jit(lambda x: sample(exact_denoiser(schedule), jax.random.key(0), SHAPE,
                                    num_steps, x_T=x, **options))(jnp.asarray(X_T))
    err = np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max()
    assert err < 1e-5, (err, np.asarray(ours).ravel(), theirs.ravel())


EULER_A_ROWS = [
    ("euler_a_sd", dict(timestep_spacing="leading", steps_offset=1),
     dict(sigma_schedule="timesteps", spacing="leading", steps_offset=1)),
    ("euler_a_linspace", dict(timestep_spacing="linspace"),
     dict(sigma_schedule="timesteps", spacing="linspace", fractional_timesteps=True,
          init_noise="sigma_max")),
]


@pytest.mark.parametrize("num_steps", [10, 20, 50])
@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
@pytest.mark.parametrize("row", EULER_A_ROWS, ids=[r[0] for r in EULER_A_ROWS])
def test_euler_ancestral_matches_diffusers_given_the_same_noise(row, betas, num_steps,
                                                                monkeypatch):
    """EulerAncestralDiscreteScheduler vs euler_a (eta = 1), with diffusers' noise draws
    replaced by ours: step j's noise enters our plan's evaluation j + 1, salt j + 2."""
    _, config, options = row
    key = jax.random.key(3)
    keys = sample_keys(key, SHAPE[0])
    noises = [np.asarray(per_sample_normal(keys, SHAPE[1:], j + 2), np.float64)
              for j in range(num_steps - 1)] + [np.zeros(SHAPE)]  # last: sigma_up = 0
    draws = iter(noises)
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor",
                        lambda *args, **kwargs: torch.from_numpy(next(draws)))
    schedule = schedule_from_diffusers(betas)
    theirs = run_diffusers(make_scheduler(EulerAncestralDiscreteScheduler, betas, config),
                           num_steps)
    ours = jax.jit(lambda x: get_sampler("euler_a")(exact_denoiser(schedule), key, SHAPE,
                                                    num_steps, x_T=x, **options))(
        jnp.asarray(X_T))
    err = np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max()
    assert err < 1e-5, (err, np.asarray(ours).ravel(), theirs.ravel())


@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
def test_our_schedules_are_diffusers_tables(betas):
    ours = make_schedule(betas, 1000).alpha_bar_table
    theirs = schedule_from_diffusers(betas).alpha_bar_table
    np.testing.assert_allclose(ours, theirs, rtol=2e-5)
