"""Registers the EDM and consistency objectives in diffusion.train.objectives.OBJECTIVES.

    edm                        EDM denoiser training (lognormal sigma, lambda = 1/c_out^2)
    consistency_training       CT / iCT (no teacher); the recipe is in config.consistency
    consistency_distillation   CD from a diffusion model trained by this codebase

All three sample through `ve_denoiser`: a Denoiser (pred_type "x0") over the VP view
of the sigma-space model, so every sampler in diffusion.samplers can drive them (the
consistency models with the "consistency" sampler).

Where the CD teacher lives. The teacher's EMA params are part of the train state, in
state.aux['teacher'] (replicated, never optimised): `init_aux` gives them their shape
from the teacher's own config.json, `prepare` loads them from the teacher's newest
checkpoint on a fresh run, and a resumed run restores them from the student's own
checkpoint, so it no longer needs the teacher's checkpoints (only its config.json,
which defines their shapes). The price is that every student checkpoint carries a copy
of the teacher's params. Any teacher works: eps / x0 / v prediction with any schedule
(objective "diffusion") or an EDM model (objective "edm"); its x0 at VE level sigma
comes from `bridge.sigma_space_x0` at t = schedule.t_from_ve_sigma(sigma), without the
teacher config's sample.clip_x0 / dynamic_threshold (see `raw_teacher`).
"""
from __future__ import annotations

import copy
import functools
import logging
import os

import jax
import jax.numpy as jnp

from diffusion.consistency import bridge
from diffusion.consistency.config import precond_from_config, section, spec_from_config
from diffusion.consistency.edm import denoise, flax_net_fn
from diffusion.consistency.step import make_consistency_train_step, make_edm_train_step
from diffusion.denoiser import Denoiser
from diffusion.train.objectives import OBJECTIVES, Objective

log = logging.getLogger(__name__)


def _schedule(run):
    s = section(run.config)
    return bridge.ve_schedule(int(s.bridge_T), float(s.sigma_min), float(s.sigma_max),
                              float(s.rho))


def _make_denoiser(consistency: bool):
    def make(run, params) -> Denoiser:
        precond = precond_from_config(run.config, consistency)
        net = flax_net_fn(run.model, params, train=False)
        clip = run.config.sample.clip_x0 if run.config.sample.clip_x0 > 0 else None
        return bridge.ve_denoiser(lambda x, sigma, y: denoise(net, x, sigma, y, precond),
                                  _schedule(run), clip)
    return make


def _common(run) -> dict:
    c = run.config
    return dict(num_classes=run.num_classes, label_dropout=c.conditioning.label_dropout,
                ema_rate=c.ema.decay, ema_warmup=c.ema.warmup)


def _check_not_learned_sigma(run):
    if run.config.diffusion.learned_sigma:
        raise ValueError(f"objective {run.config.train.objective!r} has no learned variance; "
                         "set diffusion.learned_sigma=False")


# ---- EDM -----------------------------------------------------------------------------

def _edm_step(run):
    _check_not_learned_sigma(run)
    s = section(run.config)
    return make_edm_train_step(run.model, run.tx, run.lr_fn,
                               precond=precond_from_config(run.config, False),
                               p_mean=float(s.p_mean), p_std=float(s.p_std), **_common(run))


# ---- consistency training ------------------------------------------------------------

def _target_aux(run, state):
    if not spec_from_config(run.config).has_target_net:
        return state
    # The target network starts equal to the online network.
    return state.replace(aux=dict(state.aux, target=state.params))


def _ct_step(run):
    _check_not_learned_sigma(run)
    return make_consistency_train_step(run.model, run.tx, run.lr_fn,
                                       spec=spec_from_config(run.config),
                                       precond=precond_from_config(run.config, True),
                                       **_common(run))


# ---- consistency distillation --------------------------------------------------------

def _teacher_workdir(run) -> str:
    workdir = section(run.config).teacher_workdir
    if not workdir:
        raise ValueError(
            "consistency.teacher_workdir is empty: consistency distillation needs a teacher "
            "trained by this codebase, e.g. `python launch.py --config "
            "configs/edm_fashion_mnist.py --workdir runs/edm_fashion_mnist`, then "
            "--config.consistency.teacher_workdir=runs/edm_fashion_mnist")
    return os.path.abspath(workdir)


@functools.lru_cache(maxsize=4)
def _teacher_run_cached(workdir: str, mtime: float, devices: tuple):
    from diffusion.train.setup import build_run, read_run_config  # setup imports the registry
    return build_run(read_run_config(workdir), workdir, list(devices))


def teacher_run(run):
    """The teacher's Run, built from <teacher_workdir>/config.json (cached)."""
    workdir = _teacher_workdir(run)
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"consistency.teacher_workdir={workdir!r} holds no config.json: is it the "
            "workdir of a finished training run of this codebase?")
    t = _teacher_run_cached(workdir, os.path.getmtime(path), tuple(run.mesh.devices.flat))
    if tuple(t.image_shape) != tuple(run.image_shape):
        raise ValueError(f"the teacher in {workdir} takes images of shape {t.image_shape}, "
                         f"the student {run.image_shape}")
    if t.num_classes != run.num_classes:
        raise ValueError(f"the teacher in {workdir} has {t.num_classes} classes, the "
                         f"student conditioning.num_classes={run.num_classes}")
    s = section(run.config)
    bridge.check_sigma_range(t.objective.denoiser(t, None).schedule, float(s.sigma_min),
                             float(s.sigma_max))
    return t


def raw_teacher(t):
    """The teacher Run with its sampling-only x0 clipping and dynamic thresholding off.

    Those keys of the teacher's `sample` section shape how the teacher draws images, not
    the model: the distillation ODE is the probability-flow ODE of the model itself
    (the official consistency-models code denoises with the raw teacher), and on latents,
    which are not confined to [-1, 1], clipping would bend every teacher step. The
    cached teacher Run is left untouched: this is a shallow copy with its own config.
    """
    config = copy.deepcopy(t.config)
    config.sample.clip_x0 = 0.0
    config.sample.dynamic_threshold = 0.0
    raw = copy.copy(t)
    raw.config = config
    return raw


def _teacher_fn(run):
    t = raw_teacher(teacher_run(run))
    w = float(section(run.config).teacher_guidance)
    guidance = w if (w > 0 and run.num_classes > 0) else None

    def teacher_x0(params, x_ve, sigma, y):
        den = t.objective.denoiser(t, params)
        return bridge.sigma_space_x0(den, x_ve, sigma, y, guidance)
    return teacher_x0


def _cd_init_aux(run, state):
    # Shapes only: `prepare` fills in the real params on a fresh run.
    t = teacher_run(run)
    teacher = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), t.abstract_state.ema_params)
    return _target_aux(run, state.replace(aux=dict(state.aux, teacher=teacher)))


def _cd_prepare(run, state):
    from diffusion.checkpointing import Checkpointer
    t = teacher_run(run)
    ckpt = Checkpointer(os.path.join(t.workdir, "checkpoints"))
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"the teacher workdir {t.workdir} has no finished "
                                    "checkpoint: train the teacher first")
        teacher_state, _ = ckpt.restore(t.abstract_state, step)
    finally:
        ckpt.close()
    log.info("loaded the CD teacher's EMA params from %s (step %d)", t.workdir, step)
    # Place every tree as the student's state sharding says (replicated, or FSDP).
    shard = run.state_sharding
    teacher = jax.device_put(teacher_state.ema_params, shard.aux["teacher"])
    aux = dict(state.aux, teacher=teacher)
    if not section(run.config).init_from_teacher:
        return state.replace(aux=aux)
    if (jax.tree.structure(teacher) != jax.tree.structure(state.params) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(teacher),
                                               jax.tree.leaves(state.params)))):
        raise ValueError("consistency.init_from_teacher needs the student network to be "
                         "the teacher's (same model config); they differ")
    # Separate buffers per copy: the train step donates the whole state.
    copy = lambda sharding: jax.tree.map(lambda a, s: jax.device_put(jnp.copy(a), s),
                                         teacher, sharding)
    params = copy(shard.params)
    if "target" in aux:
        aux["target"] = copy(shard.aux["target"])
    opt_state = jax.jit(run.tx.init, out_shardings=shard.opt_state)(params)
    return state.replace(params=params, ema_params=copy(shard.ema_params),
                         opt_state=opt_state, aux=aux)


def _cd_step(run):
    _check_not_learned_sigma(run)
    return make_consistency_train_step(run.model, run.tx, run.lr_fn,
                                       spec=spec_from_config(run.config),
                                       precond=precond_from_config(run.config, True),
                                       teacher_fn=_teacher_fn(run), **_common(run))


def _identity(run, state):
    return state


OBJECTIVES.update({
    "edm": Objective(_edm_step, _identity, _identity, _make_denoiser(False)),
    "consistency_training": Objective(_ct_step, _target_aux, _identity, _make_denoiser(True)),
    "consistency_distillation": Objective(_cd_step, _cd_init_aux, _cd_prepare,
                                          _make_denoiser(True)),
})
