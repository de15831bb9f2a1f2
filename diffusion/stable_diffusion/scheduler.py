"""A diffusers scheduler config (`scheduler/scheduler_config.json`) read as our noise
schedule, parameterisation and sampler options.

The config fixes what the network was trained with: the beta table (`beta_schedule`
linear | scaled_linear | squaredcos_cap_v2, `beta_start`, `beta_end`,
`num_train_timesteps`, or explicit `trained_betas`; `rescale_betas_zero_snr`) and the
network's output (`prediction_type` epsilon | v_prediction | sample). It also carries
the options of the scheduler it was saved with (`timestep_spacing`, `steps_offset`,
`set_alpha_to_one`, `clip_sample`, ...). A diffusers user switches samplers with
`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`: keys the new class
knows are taken from the file, missing ones from that class's defaults (a PNDM config
without `timestep_spacing` gives DPM-Solver++ its own default, "linspace"). `setup`
does the same for each of our samplers that has a diffusers counterpart, with the
options `diffusion/samplers/README.md` checks against diffusers; the other samplers run
with their own defaults on the same schedule.

What diffusers feeds the U-Net as its timestep is matched too: an integer for the
discrete schedulers and DPM-Solver's Karras grid (rounded), a fractional index for the
Euler / Heun family; samplers without a diffusers counterpart use the project's
continuous c_noise = t T - 1.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import numpy as np

from diffusion import samplers
from diffusion.samplers import grids
from diffusion.schedules import (BETA_SCHEDULES, ZTSNR_MIN_ALPHA_BAR, Schedule,
                                 rescale_zero_terminal_snr)

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

# Each sampler with a diffusers counterpart -> the defaults of that scheduler class that
# `setup` reads (from_config fills a key the file lacks from them).
_DDIM = dict(timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True,
             clip_sample=True, clip_sample_range=1.0)
_DPM = dict(timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
            lower_order_final=True, euler_at_final=False)
_EULER = dict(timestep_spacing="linspace", steps_offset=0)
COUNTERPARTS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", _DDIM),
    "plms": ("PNDMScheduler", dict(timestep_spacing="leading", steps_offset=0,
                                   set_alpha_to_one=False, skip_prk_steps=False)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", _DPM),
    "dpmpp_3m": ("DPMSolverMultistepScheduler(solver_order=3)", _DPM),
    "euler": ("EulerDiscreteScheduler", _EULER),
    "heun": ("HeunDiscreteScheduler", _EULER),
    "euler_a": ("EulerAncestralDiscreteScheduler", _EULER),
}
KARRAS_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "euler", "heun", "euler_a")
ETA_SAMPLERS = ("ddim",)


class SamplerSetup(NamedTuple):
    """How one sampler runs on this schedule: its options, the x0 clipping of the
    Denoiser (diffusers' clip_sample; None = off), and whether the U-Net gets the
    rounded (integer) timestep."""
    options: dict
    clip_x0: Optional[float]
    round_timesteps: bool


def read_scheduler_config(path: str | os.PathLike) -> dict:
    """scheduler_config.json of a pipeline folder (`scheduler/`), a scheduler folder, or
    the file itself -> its dict."""
    path = os.fspath(path)
    for candidate in (os.path.join(path, "scheduler", "scheduler_config.json"),
                      os.path.join(path, "scheduler_config.json"), path):
        if os.path.isfile(candidate):
            with open(candidate) as fh:
                return json.load(fh)
    raise FileNotFoundError(f"no scheduler/scheduler_config.json in {path}")


def prediction_type(config: Mapping[str, Any]) -> str:
    """Our pred_type (eps | v | x0) for the config's prediction_type."""
    name = config.get("prediction_type", "epsilon")
    if name not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {name!r} in the scheduler config; "
                         f"known: {sorted(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[name]


def _betas(config: Mapping[str, Any], T: int) -> np.ndarray:
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
        if betas.shape != (T,):
            raise ValueError(f"trained_betas has {betas.size} entries, "
                             f"num_train_timesteps is {T}")
        return betas
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":  # diffusers' linear is not rescaled by 1000 / T (ours is)
        return np.linspace(start, end, T, dtype=np.float64)
    if kind == "scaled_linear":
        return BETA_SCHEDULES["scaled_linear"](T, start, end)
    if kind == "squaredcos_cap_v2":
        return BETA_SCHEDULES["cosine"](T)
    raise ValueError(f"unsupported beta_schedule {kind!r} in the scheduler config; known: "
                     "linear, scaled_linear, squaredcos_cap_v2 (or trained_betas)")


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """Our discrete Schedule with diffusers' alphas_cumprod for this config."""
    if config.get("thresholding"):
        raise ValueError("the scheduler config sets thresholding=True (dynamic "
                         "thresholding of pixel-space models), which is not supported here")
    T = int(config.get("num_train_timesteps", 1000))
    alpha_bar = np.cumprod(1.0 - _betas(config, T))
    name = f"diffusers_{config.get('beta_schedule', 'trained_betas')}"
    if config.get("rescale_betas_zero_snr"):
        alpha_bar = np.maximum(rescale_zero_terminal_snr(alpha_bar), ZTSNR_MIN_ALPHA_BAR)
        name += "+ztsnr"
    return Schedule(name, alpha_bar)


def _spacing(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[str, dict]:
    """(timestep spacing, {"steps_offset": k} where it applies: leading only, as in
    diffusers, which ignores steps_offset for linspace and trailing)."""
    spacing = config.get("timestep_spacing") or defaults["timestep_spacing"]
    if spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"unsupported timestep_spacing {spacing!r} in the scheduler "
                         "config; known: linspace, leading, trailing")
    offset = int(config.get("steps_offset", defaults.get("steps_offset", 0)) or 0)
    return spacing, ({"steps_offset": offset} if spacing == "leading" and offset else {})


def setup(config: Mapping[str, Any], schedule: Schedule, sampler: str, *,
          karras: Optional[bool] = None, eta: float = 0.0) -> SamplerSetup:
    """The options that make `sampler` reproduce the diffusers scheduler a pipeline gets
    from `<its class>.from_config(config)` (see COUNTERPARTS and the samplers' README).

    karras: Karras et al.'s noise levels (diffusers' use_karras_sigmas) for the samplers
    that have them (KARRAS_SAMPLERS); None = on for those, off elsewhere. eta: DDIM's
    (Euler ancestral's own `eta`, default 1, is a sampler option).
    """
    name = samplers.canonical_name(sampler)
    if karras and name not in KARRAS_SAMPLERS:
        raise ValueError(f"karras=True: sampler {name!r} has no Karras grid; those that "
                         f"do: {', '.join(KARRAS_SAMPLERS)}")
    if eta and name not in ETA_SAMPLERS:
        raise ValueError(f"eta={eta}: only {', '.join(ETA_SAMPLERS)} take eta")
    karras = name in KARRAS_SAMPLERS if karras is None else bool(karras)
    if name not in COUNTERPARTS:
        return SamplerSetup({}, None, False)
    defaults = COUNTERPARTS[name][1]
    get = lambda key: config.get(key, defaults.get(key))  # noqa: E731 (from_config)
    spacing, offset = _spacing(config, defaults)
    clip = float(get("clip_sample_range")) if get("clip_sample") else None
    trained_max = grids.ve_sigma_range(schedule)[1]
    if name == "ddim":
        opts = dict(spacing=spacing, set_alpha_to_one=bool(get("set_alpha_to_one")),
                    eta=float(eta), **offset)
        if spacing == "linspace":
            opts["prev_timestep"] = "stride"
        return SamplerSetup(opts, clip, True)
    if name == "plms":
        opts = dict(spacing=spacing, set_alpha_to_one=bool(get("set_alpha_to_one")),
                    warmup="pseudo_euler" if get("skip_prk_steps") else "prk", **offset)
        if spacing == "linspace":
            opts["prev_timestep"] = "stride"
        return SamplerSetup(opts, None, True)
    if name in ("dpmpp_2m", "dpmpp_3m"):
        if get("euler_at_final"):
            raise ValueError("euler_at_final=True in the scheduler config is not supported")
        opts = dict(final_step=get("final_sigmas_type"),
                    lower_order_final=bool(get("lower_order_final")),
                    lower_order_final_below=15)
        if karras:
            opts.update(skip_type="karras", sigma_max=trained_max)
        else:
            opts.update(skip_type=spacing, **offset)
        if name == "dpmpp_3m":
            opts["dpmpp3m_coef"] = "diffusers"
        # diffusers rounds its Karras timesteps except for squaredcos_cap_v2 tables.
        return SamplerSetup(opts, None,
                            config.get("beta_schedule") != "squaredcos_cap_v2")
    # euler, heun, euler_a: sigma-based, fed fractional timesteps.
    if karras:
        opts = dict(sigma_schedule="karras", sigma_max=trained_max, init_noise="sigma_max")
    else:
        opts = dict(sigma_schedule="timesteps", spacing=spacing, **offset)
        if spacing == "linspace":
            opts.update(fractional_timesteps=True, init_noise="sigma_max")
        elif spacing == "trailing":
            opts["init_noise"] = "sigma_max"
    return SamplerSetup(opts, None, False)
