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
import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Optional

from diffusion.samplers import consistency, ddim, ddpm, dpm_solver, flow, karras, plms
from diffusion.schedules import make_schedule


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered sampler, declared once.

    `sample(denoiser, key, shape, num_steps, ..., **options)` runs it; its keyword
    parameters, less the run-time arguments (_RUNTIME_ARGS) and `fixed`, are the options
    it takes (checked by `check_options`). Its NFE is the `num_evals` of the plan
    `plan(schedule, num_steps, **options)` compiles, or, for a sampler with its own loop,
    `num_evals(schedule, num_steps, **options)`. `fixed` are the options the name sets
    (dpm_solver_2: order=2), passed to both. `config_keys` are the older `sample.*`
    config keys that reach this sampler (diffusion.sampling maps each to its option);
    any other option comes from `sample.options`."""
    sample: Callable
    plan: Optional[Callable] = None
    num_evals: Optional[Callable[..., int]] = None
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config_keys: tuple[str, ...] = ()


_DPM_KEYS = ("skip_type", "denoise_to_zero")
_KARRAS_KEYS = ("spacing", "sigma_schedule", "sigma_min", "sigma_max", "rho")
_CHURN_KEYS = ("s_noise", "s_churn", "s_tmin", "s_tmax")


def _plan_euler_ancestral(schedule, num_steps: int, eta: float = 1.0, **options):
    return karras.plan_karras(schedule, num_steps, ancestral_eta=eta, **options)


# The one registry: name -> Entry. A new sampler is its function(s) and one entry here.
REGISTRY: dict[str, Entry] = {
    "ddpm": Entry(ddpm.sample, num_evals=ddpm.num_evals, config_keys=("spacing", "variance")),
    "ddim": Entry(ddim.sample, num_evals=ddim.num_evals, config_keys=("eta", "spacing")),
    "dpm_solver_1": Entry(dpm_solver.sample_singlestep, dpm_solver.plan_singlestep,
                          fixed=dict(order=1), config_keys=_DPM_KEYS),
    "dpm_solver_2": Entry(dpm_solver.sample_singlestep, dpm_solver.plan_singlestep,
                          fixed=dict(order=2), config_keys=_DPM_KEYS),
    "dpm_solver_3": Entry(dpm_solver.sample_singlestep, dpm_solver.plan_singlestep,
                          fixed=dict(order=3), config_keys=_DPM_KEYS),
    "dpmpp_2s": Entry(dpm_solver.sample_singlestep, dpm_solver.plan_singlestep,
                      fixed=dict(order=2, data_form=True), config_keys=_DPM_KEYS),
    # sample.sigma_min / sigma_max / rho are the Karras samplers' keys; DPM-Solver++'s
    # Karras grid (grid=karras) takes its own through sample.options.
    "dpmpp_2m": Entry(dpm_solver.sample_multistep, dpm_solver.plan_multistep,
                      fixed=dict(order=2), config_keys=_DPM_KEYS + ("lower_order_final",)),
    "dpmpp_3m": Entry(dpm_solver.sample_multistep, dpm_solver.plan_multistep,
                      fixed=dict(order=3), config_keys=_DPM_KEYS + ("lower_order_final",)),
    "euler": Entry(karras.sample_euler, karras.plan_karras,
                   config_keys=_KARRAS_KEYS + _CHURN_KEYS),
    "heun": Entry(karras.sample_heun, functools.partial(karras.plan_karras, heun=True),
                  config_keys=_KARRAS_KEYS + _CHURN_KEYS),
    "euler_a": Entry(karras.sample_euler_ancestral, _plan_euler_ancestral,
                     config_keys=_KARRAS_KEYS + ("ancestral_eta", "s_noise")),
    "plms": Entry(plms.sample, plms.plan_plms, config_keys=("spacing", "plms_warmup")),
    "consistency": Entry(consistency.sample, consistency.plan_consistency,
                         config_keys=("consistency_sigmas", "sigma_min", "sigma_max", "rho")),
    "flow_euler": Entry(flow.sample_euler, functools.partial(flow.plan_flow, method="euler")),
    "flow_midpoint": Entry(flow.sample_midpoint,
                           functools.partial(flow.plan_flow, method="midpoint")),
}
# name -> the sampler as it runs (its fixed options bound).
SAMPLERS: dict[str, Callable] = {
    name: functools.partial(e.sample, **e.fixed) if e.fixed else e.sample
    for name, e in REGISTRY.items()}
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


def option_names(name: str) -> tuple[str, ...]:
    """The options sampler `name` takes: its keyword parameters, less the run-time
    arguments and the options its name fixes."""
    entry = REGISTRY[canonical_name(name)]
    return tuple(k for k in inspect.signature(entry.sample).parameters
                 if k not in _RUNTIME_ARGS and k not in entry.fixed)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raises ValueError naming any option that sampler `name` does not take."""
    name = canonical_name(name)
    fixed = REGISTRY[name].fixed
    if set(options) & set(fixed):
        raise ValueError(f"sampler {name!r} fixes "
                         f"{', '.join(f'{k}={v!r}' for k, v in fixed.items())}; to change "
                         f"{sorted(set(options) & set(fixed))}, pick another sampler")
    known = option_names(name)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ValueError(f"sampler {name!r} has no option(s) {unknown}; "
                         f"its options: {sorted(known)}")


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
    entry = REGISTRY[name]
    if entry.num_evals is not None:
        return entry.num_evals(schedule, num_steps, **entry.fixed, **options)
    return entry.plan(schedule, num_steps, **entry.fixed, **options).num_evals
