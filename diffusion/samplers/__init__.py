"""Samplers behind one interface (see `base`), looked up by name in SAMPLERS.

    x0 = get_sampler("ddim")(denoiser, key, shape, num_steps, y=..., guidance=..., eta=0.)

`num_steps` counts steps; NFE (network evaluations) per sample is
`nfe(name, num_steps, schedule, **options)`, counted from the sampler's own compiled
plan (or, for DDPM / DDIM, its step grid) with those options, so it cannot drift from
what the sampler runs (image-to-image runs only the steps with t <= strength, and the
count says so). A guided step batches its conditional and unconditional passes into one
call, counted once. With the default options:

  ddpm, ddim                      1 a step                      (ddpm, ddim modules)
  dpm_solver_1, _2, _3            k a step (singlestep order k)  (dpm_solver)
  dpmpp_2s                        2 a step                      (dpm_solver)
  dpmpp_2m, dpmpp_3m              1 a step (multistep)           (dpm_solver)
  euler, euler_a                  1 a step                      (karras)
  heun                            2 N - 1 (last step Euler)      (karras)
  plms                            N + 1 (pseudo_euler warm-up; prk: N + 9; see plms)
  consistency                     1 a step                      (consistency)
  flow_euler                      1 a step (Euler in t, shift)   (flow)
  flow_midpoint                   2 a step (midpoint in t)       (flow)
DPM-Solver variants take one more with denoise_to_zero=True.

Every sampler runs on any Gaussian path (`diffusion.paths`: VP tables and continuous VP,
VE, rectified flow), read from `denoiser.schedule`; see each module for where a path
moves its grid (logSNR grids span the path's [t_min, t_max]).

Which options reproduce which diffusers scheduler: README.md next to this file.
"""
from __future__ import annotations

import ast
import functools
import inspect
from typing import Callable

from diffusion.samplers import consistency, ddim, ddpm, dpm_solver, flow, karras, plms
from diffusion.schedules import make_schedule

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
    "flow_euler": flow.sample_euler,
    "flow_midpoint": flow.sample_midpoint,
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
    "rf_euler": "flow_euler",
    "midpoint": "flow_midpoint",
}
# name -> fn(schedule, num_steps, **options) -> the compiled plan (plan.Tables) that the
# sampler runs with those options; its num_evals is the NFE.
PLANS: dict[str, Callable] = {
    "dpm_solver_1": functools.partial(dpm_solver.plan_singlestep, order=1),
    "dpm_solver_2": functools.partial(dpm_solver.plan_singlestep, order=2),
    "dpm_solver_3": functools.partial(dpm_solver.plan_singlestep, order=3),
    "dpmpp_2s": functools.partial(dpm_solver.plan_singlestep, order=2, data_form=True),
    "dpmpp_2m": functools.partial(dpm_solver.plan_multistep, order=2),
    "dpmpp_3m": functools.partial(dpm_solver.plan_multistep, order=3),
    "euler": karras.plan_karras,
    "heun": functools.partial(karras.plan_karras, heun=True),
    "euler_a": lambda schedule, n, eta=1.0, **o: karras.plan_karras(schedule, n,
                                                                    ancestral_eta=eta, **o),
    "plms": plms.plan_plms,
    "consistency": consistency.plan_consistency,
    "flow_euler": functools.partial(flow.plan_flow, method="euler"),
    "flow_midpoint": functools.partial(flow.plan_flow, method="midpoint"),
}
# Samplers with their own loop: fn(schedule, num_steps, **options) -> NFE.
_NUM_EVALS: dict[str, Callable[..., int]] = {"ddpm": ddpm.num_evals, "ddim": ddim.num_evals}
# Arguments of a sampler that are not options (they never change the NFE).
_RUNTIME_ARGS = ("denoiser", "key", "shape", "num_steps", "y", "guidance", "x_T",
                 "sample_offset", "x_init", "mask", "callback", "return_intermediates")


def canonical_name(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return name


def get_sampler(name: str) -> Callable:
    return SAMPLERS[canonical_name(name)]


@functools.lru_cache(maxsize=None)
def _default_schedule():
    return make_schedule("linear", 1000)


def check_options(name: str, options: dict) -> None:
    """Raises ValueError naming any option that sampler `name` does not take."""
    params = inspect.signature(get_sampler(name)).parameters
    unknown = sorted(k for k in options if k not in params or k in _RUNTIME_ARGS)
    if unknown:
        known = sorted(k for k in params if k not in _RUNTIME_ARGS)
        raise ValueError(f"sampler {canonical_name(name)!r} has no option(s) {unknown}; "
                         f"its options: {known}")


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets, so "sigmas=(2.0, 1.0),rho=5" is two items."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _literal(value: str):
    """A Python literal (1, 0.5, False, (2.0, 1.0)), true / false / none in any case,
    a float such as inf, or else the string itself (zero, leading)."""
    lowered = value.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    try:
        return float(value)
    except ValueError:
        return value


def parse_options(text: str) -> dict:
    """ "steps_offset=1,final_step=zero" -> {"steps_offset": 1, "final_step": "zero"}.

    The key=value syntax of the benchmark's sampler specs (ddim:eta=1.0) with commas
    between options; values are Python literals or else strings. Check the result
    against a sampler with `check_options`."""
    options = {}
    for item in _split_top_level(text or ""):
        key, has_value, value = item.partition("=")
        if not has_value or not key.strip():
            raise ValueError(f"sampler option {item!r} in {text!r} is not key=value")
        options[key.strip()] = _literal(value.strip())
    return options


def nfe(name: str, num_steps: int, schedule=None, **options) -> int:
    """Network evaluations per sample of sampler `name` run for num_steps with these
    options (on `schedule`; default DDPM's linear T = 1000, which gives the same count
    for every schedule unless strength < 1 or num_steps > T): the number of evaluations
    of the plan the sampler compiles, or of DDPM's / DDIM's steps."""
    name = canonical_name(name)
    check_options(name, options)
    schedule = _default_schedule() if schedule is None else schedule
    if name in _NUM_EVALS:
        return _NUM_EVALS[name](schedule, num_steps, **options)
    return PLANS[name](schedule, num_steps, **options).num_evals
