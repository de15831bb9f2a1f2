"""The `flow` config section (objectives "flow" and "reflow") and the path it builds.

Configs that train with flow matching call `add_flow_config(c)` and then change keys:

    path            flow | cosine_vp | linear_vp | ve: the Gaussian path (diffusion.paths)
    T               network time input c_noise = T t - 1 (paths.GaussianPath.c_noise),
                    the fractional-index scale the U-Net's sinusoidal embedding expects
    time_sampling   uniform | logit_normal | mode (diffusion.flow_matching)
    location, scale logit-normal t = sigmoid(location + scale n) (SD3: 0, 1)
    mode_scale      s of the mode sampling f_mode(u; s), in [-1, 2 / (pi - 2)] (SD3: 1.29)
    shift           SD3's timestep shift applied to the sampled t (1 = none); sampling
                    with the same shift is `sample.options="flow_euler.shift=S"`
    weighting       simple (the velocity MSE) | snr | min_snr | truncated_snr, x0-space
    min_snr_gamma   gamma of min_snr
    init_workdir    a run of this codebase whose EMA params start a fresh run ("" = a
                    random init): reflow starts from the flow model that made its pairs

A config without the section (configs/default.py with --config.train.objective=flow)
gets these defaults. The section is part of config.json, so `diffusion.load` rebuilds
the same path and time input for sampling.
"""
from __future__ import annotations

import ml_collections

from diffusion import flow_matching
from diffusion.paths import GaussianPath, make_path


def flow_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        path="flow", T=1000, time_sampling="logit_normal", location=0.0, scale=1.0,
        mode_scale=1.29, shift=1.0, weighting="simple", min_snr_gamma=5.0,
        init_workdir=""))


def add_flow_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the `flow` section with its defaults (in place); returns c."""
    c.flow = flow_defaults()
    return c


def section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.flow, or the defaults when the config has none."""
    return config.flow if "flow" in config else flow_defaults()


def path_from_config(config: ml_collections.ConfigDict) -> GaussianPath:
    """The section's path with its network time scale T."""
    s = section(config)
    if int(s.T) <= 0:
        raise ValueError(f"flow.T must be a positive time scale, got {s.T}")
    return make_path(s.path, T=int(s.T))


def loss_kwargs(config: ml_collections.ConfigDict) -> dict:
    """The keyword arguments of flow_matching.flow_matching_loss, checked."""
    s = section(config)
    flow_matching.check_time_sampling(s.time_sampling, float(s.scale), float(s.mode_scale),
                                      float(s.shift))
    if s.weighting not in flow_matching.WEIGHTINGS:
        raise ValueError(f"unknown flow.weighting {s.weighting!r}; known: "
                         f"{flow_matching.WEIGHTINGS}")
    return dict(time_sampling=s.time_sampling, location=float(s.location),
                scale=float(s.scale), mode_scale=float(s.mode_scale), shift=float(s.shift),
                weighting=s.weighting, min_snr_gamma=float(s.min_snr_gamma))
