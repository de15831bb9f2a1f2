"""The `consistency` config section (EDM and consistency objectives) and what it builds:
the preconditioning, the consistency spec and the samplers' VP view of the VE model.

Configs that train with objective "edm", "consistency_distillation" or
"consistency_training" call `add_consistency_config(c)` and then change keys:

    sigma_min, sigma_max, sigma_data, rho   the VE noise range, sigma_data = 0.5, rho = 7
    net_t_scale                             network t input = net_t_scale * log(sigma) / 4
    bridge_T                                noise levels of the samplers' VP view
    p_mean, p_std                           EDM training: log sigma ~ N(p_mean, p_std^2)
    curriculum                              fixed (N = num_scales) | ct | ict
    num_scales, s0, s1                      N, and the curricula's start / end
    target_ema, target_ema_schedule         mu; constant | ct (mu0 = target_ema) | none
    index_sampling, index_p_mean/p_std      uniform | lognormal (iCT: -1.1, 2.0)
    weighting                               uniform | inverse_step (1/(s_{n+1} - s_n))
    distance, huber_c                       l2 | pseudo_huber; c = 0: 0.00054 sqrt(d)
    teacher_workdir                         CD: workdir of a run trained by this codebase
    teacher_guidance                        CD: CFG weight for a class-conditional teacher
                                            (0 = no guidance)
    ode_solver                              CD: euler | heun
    init_from_teacher                       CD: start from the teacher's EMA params
    parameterisation                        edm: the EDM-preconditioned network (Song et
                                            al.); diffusion: f = c_skip x + (1 - c_skip)
                                            x0 of a network read as the `diffusion`
                                            section says (pred_type, schedule), as
                                            latent consistency models do: a student of
                                            a diffusion teacher's kind can start from it

A config without the section (e.g. configs/default.py with
--config.train.objective=edm cannot add keys) gets these defaults.
"""
from __future__ import annotations

import ml_collections

from diffusion.consistency import bridge
from diffusion.consistency.edm import Precond
from diffusion.consistency.losses import ConsistencySpec
from diffusion.schedules import Schedule


def consistency_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, net_t_scale=1000.0,
        bridge_T=1000,
        p_mean=-1.2, p_std=1.2,
        curriculum="fixed", num_scales=18, s0=2, s1=150,
        target_ema=0.95, target_ema_schedule="constant",
        index_sampling="uniform", index_p_mean=-1.1, index_p_std=2.0,
        weighting="uniform", distance="pseudo_huber", huber_c=0.0,
        teacher_workdir="", teacher_guidance=0.0, ode_solver="heun",
        init_from_teacher=False, parameterisation="edm",
    ))


def add_consistency_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the `consistency` section with its defaults (in place); returns c."""
    c.consistency = consistency_defaults()
    return c


def section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.consistency, or the defaults when the config has none."""
    return config.consistency if "consistency" in config else consistency_defaults()


def precond_from_config(config: ml_collections.ConfigDict, consistency: bool) -> Precond:
    s = section(config)
    return Precond(sigma_data=float(s.sigma_data), sigma_min=float(s.sigma_min),
                   consistency=consistency, net_t_scale=float(s.net_t_scale))


def spec_from_config(config: ml_collections.ConfigDict) -> ConsistencySpec:
    s = section(config)
    return ConsistencySpec(
        total_steps=int(config.train.num_steps), sigma_min=float(s.sigma_min),
        sigma_max=float(s.sigma_max), rho=float(s.rho), curriculum=s.curriculum,
        num_scales=int(s.num_scales), s0=int(s.s0), s1=int(s.s1),
        target_ema=float(s.target_ema), target_schedule=s.target_ema_schedule,
        index_sampling=s.index_sampling, index_p_mean=float(s.index_p_mean),
        index_p_std=float(s.index_p_std), weighting=s.weighting, distance=s.distance,
        huber_c=float(s.huber_c), ode_solver=s.ode_solver)


def ve_schedule_from_config(config: ml_collections.ConfigDict) -> Schedule:
    """The VP view of the section's VE noise range that the samplers walk."""
    s = section(config)
    return bridge.ve_schedule(int(s.bridge_T), float(s.sigma_min), float(s.sigma_max),
                              float(s.rho))
