"""Samplers behind one interface (see `base`), looked up by name in SAMPLERS.

    x0 = get_sampler("ddim")(denoiser, key, shape, num_steps, y=..., guidance=..., eta=0.)

`num_steps` counts steps; NFE (network evaluations) per sample is `nfe(name, num_steps,
**options)` (for strength = 1; image-to-image runs only the steps with t <= strength). A
guided step batches its conditional and unconditional passes into one call, counted once.

  ddpm, ddim                      1 a step                      (ddpm, ddim modules)
  dpm_solver_1, _2, _3            k a step (singlestep order k)  (dpm_solver)
  dpmpp_2s                        2 a step                      (dpm_solver)
  dpmpp_2m, dpmpp_3m              1 a step (multistep)           (dpm_solver)
  euler, euler_a                  1 a step                      (karras)
  heun                            2 N - 1 (last step Euler)      (karras)
  plms                            N + 1 (pseudo_euler warm-up; see plms)
  consistency                     1 a step                      (consistency)
DPM-Solver variants take one more with denoise_to_zero=True.
"""
from __future__ import annotations

import functools
from typing import Callable

from diffusion.samplers import consistency, ddim, ddpm, dpm_solver, karras, plms

SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm.sample,
    "ddim": ddim.sample,
    "dpm_solver_1": functools.partial(dpm_solver.sample_singlestep, order=1),
    "dpm_solver_2": functools.partial(dpm_solver.sample_singlestep, order=2),
    "dpm_solver_3": functools.partial(dpm_solver.sample_singlestep, order=3),
    "dpmpp_2s": functools.partial(dpm_solver.sample_singlestep, order=2, data_form=True),
    "dpmpp_2m": functools.partial(dpm_solver.sample_multistep, order=2),
    "dpmpp_3m": functools.partial(dpm_solver.sample_multistep, order=3),
    "euler": karras.sample_euler,
    "heun": karras.sample_heun,
    "euler_a": karras.sample_euler_ancestral,
    "plms": plms.sample,
    "consistency": consistency.sample,
}
ALIASES: dict[str, str] = {
    "ancestral": "ddpm",
    "dpm1": "dpm_solver_1",
    "dpm2": "dpm_solver_2",
    "dpm3": "dpm_solver_3",
    "dpm_solver++_2m": "dpmpp_2m",
    "dpm_solver++_3m": "dpmpp_3m",
    "dpm_solver++_2s": "dpmpp_2s",
    "euler_ancestral": "euler_a",
    "edm": "heun",
    "pndm": "plms",
}
# Network evaluations per step, for samplers that make more than one.
_NFE_PER_STEP: dict[str, int] = {}
# Samplers whose count is not a multiple of num_steps: fn(num_steps, **options) -> NFE.
_NFE_FNS: dict[str, Callable[..., int]] = {
    "dpm_solver_1": functools.partial(dpm_solver.nfe_singlestep, order=1),
    "dpm_solver_2": functools.partial(dpm_solver.nfe_singlestep, order=2),
    "dpm_solver_3": functools.partial(dpm_solver.nfe_singlestep, order=3),
    "dpmpp_2s": functools.partial(dpm_solver.nfe_singlestep, order=2),
    "dpmpp_2m": dpm_solver.nfe_multistep,
    "dpmpp_3m": dpm_solver.nfe_multistep,
    "heun": karras.nfe_heun,
    "plms": plms.nfe,
}


def canonical_name(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return name


def get_sampler(name: str) -> Callable:
    return SAMPLERS[canonical_name(name)]


def nfe(name: str, num_steps: int, **options) -> int:
    """Network evaluations per sample; options that do not affect the count are ignored."""
    name = canonical_name(name)
    if name in _NFE_FNS:
        return _NFE_FNS[name](num_steps, **options)
    return _NFE_PER_STEP.get(name, 1) * num_steps
