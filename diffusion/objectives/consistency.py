"""Objectives "consistency_training" (CT, iCT) and "consistency_distillation" (CD).

Per example: a pair index n, z ~ N(0, I), x_{n+1} = x0 + sigma_{n+1} z and
    CT: x_n = x0 + sigma_n z                                        (same noise)
    CD: x_n = one Euler/Heun PF-ODE step of the teacher from x_{n+1} to sigma_n;
loss = lambda_n d(f_theta(x_{n+1}, sigma_{n+1}), stop_grad f_target(x_n, sigma_n)).
The target network's params are state.aux['target'] (EMA of the online params with
rate mu, updated after each optimizer step), or the online params themselves when the
spec has no target network (iCT). Both networks run in training mode with the same
dropout key, as in the consistency-models code. Randomness comes from
fold_in(state.rng, step), so a step gives the same result on one device or eight and a
resumed run continues bit-for-bit. Both sample through the VP view of the VE model
(`edm.sigma_space_denoiser`), with the "consistency" sampler or any other.

The CD teacher. The layer above hands it over as `run.teacher`: the run in
consistency.teacher_workdir as `diffusion.load` builds it by shape (its config.json,
model and schedule; `restore()` reads its EMA params). Its EMA params are part of the
train state, in state.aux['teacher'] (replicated, never optimised): `init_aux` gives
them their shape, `prepare` restores them on a fresh run, and a resumed run restores
them from the student's own checkpoint, so it no longer needs the teacher's
checkpoints (only its config.json, which defines their shapes). The price is that
every student checkpoint carries a copy of the teacher's params. Any teacher works:
eps / x0 / v prediction with any schedule (objective "diffusion") or an EDM model
(objective "edm"); its x0 at VE level sigma comes from `bridge.sigma_space_x0` at
t = schedule.t_from_ve_sigma(sigma), without the teacher config's sample.clip_x0 /
dynamic_threshold (see `raw_teacher`).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from diffusion.consistency import bridge
from diffusion.consistency import losses as cm
from diffusion.consistency.edm import Precond, denoise
from diffusion.forward_process import expand
from diffusion.objectives.base import Objective, check_not_learned_sigma, unchanged
from diffusion.objectives.consistency_config import (precond_from_config, section,
                                                     spec_from_config)
from diffusion.objectives.edm import (common_step_args, flax_net_fn, sigma_space_denoiser,
                                      sigma_space_fn)
from diffusion.train_state import (TrainState, apply_gradients, drop_labels, ema_update,
                                   loss_buckets, placed_copy, restart_from, same_shapes,
                                   step_metrics)

log = logging.getLogger(__name__)

# (teacher_params, x_ve [B, H, W, C], sigma [B], y [B] or None) -> x0 [B, H, W, C]
TeacherFn = Callable[[Any, jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


def make_consistency_train_step(model, tx: optax.GradientTransformation,
                                lr_fn: optax.Schedule, *, spec: cm.ConsistencySpec,
                                precond: Precond, num_classes: int, label_dropout: float,
                                ema_rate: float, ema_warmup: bool, flat: bool = False,
                                teacher_fn: Optional[TeacherFn] = None,
                                consistency_fn: Optional[Callable] = None) -> Callable:
    """CT when teacher_fn is None, else CD with teacher params in state.aux['teacher'].
    consistency_fn(net, x, sigma, y): the model's consistency function of its network
    (default: the consistency-preconditioned `denoise` with `precond`).

    Loss buckets: n / (N - 1) in quarters (low to high noise).
    """
    if not precond.consistency:
        raise ValueError("consistency training needs Precond(consistency=True)")
    if consistency_fn is None:
        consistency_fn = lambda net, x, sigma, y: denoise(net, x, sigma, y, precond)

    def f(params, x, sigma, y, k_drop):
        net = flax_net_fn(model, params, train=True, dropout_key=k_drop)
        return consistency_fn(net, x, sigma, y)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        k_idx, k_z, k_drop, k_label = jax.random.split(key, 4)
        x0 = batch["image"]
        b = x0.shape[0]
        y = drop_labels(k_label, batch["label"], label_dropout) if num_classes > 0 else None

        num_scales = spec.num_scales_at(state.step)
        n = cm.sample_index(k_idx, b, num_scales, spec.max_scales, method=spec.index_sampling,
                            sigma_min=spec.sigma_min, sigma_max=spec.sigma_max, rho=spec.rho,
                            p_mean=spec.index_p_mean, p_std=spec.index_p_std)
        grid = lambda i: cm.karras_sigma(i, num_scales, spec.sigma_min, spec.sigma_max,
                                         spec.rho)
        sigma_n, sigma_n1 = grid(n), grid(n + 1)
        z = jax.random.normal(k_z, x0.shape, jnp.float32)
        x_n1 = x0 + expand(sigma_n1, x0) * z
        if teacher_fn is None:
            x_n = x0 + expand(sigma_n, x0) * z
        else:
            teacher = state.aux["teacher"]
            t_denoise = lambda x, s: teacher_fn(teacher, x, s, y)
            x_n = cm.ode_step(spec.ode_solver, t_denoise, x_n1, sigma_n1, sigma_n)
        x_n = jax.lax.stop_gradient(x_n)
        target_params = state.aux["target"] if spec.has_target_net else state.params
        f_target = jax.lax.stop_gradient(f(target_params, x_n, sigma_n, y, k_drop))
        weight = cm.pair_weight(spec.weighting, sigma_n, sigma_n1)

        def loss_fn(params):
            f_online = f(params, x_n1, sigma_n1, y, k_drop)
            per_example = weight * cm.distance(spec.distance, f_online, f_target, spec.huber_c)
            return jnp.mean(per_example), per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, decay = apply_gradients(state, grads, tx, ema_rate=ema_rate,
                                           ema_warmup=ema_warmup, flat=flat)
        mu = spec.mu_at(num_scales)
        if spec.has_target_net:
            aux = dict(state.aux, target=ema_update(state.aux["target"], new_state.params, mu,
                                                      flat))
            new_state = new_state.replace(aux=aux)
        metrics = dict(step_metrics(state, loss, grads, lr_fn, decay, flat),
                       num_scales=num_scales.astype(jnp.float32), target_ema=mu)
        u = (n + 1).astype(jnp.float32) / (num_scales - 1).astype(jnp.float32)
        return new_state, dict(metrics, **loss_buckets(per_example, u))

    return train_step


# ---- consistency training ------------------------------------------------------------

def _target_aux(run, state):
    if not spec_from_config(run.config).has_target_net:
        return state
    # The target network starts equal to the online network.
    return state.replace(aux=dict(state.aux, target=state.params))


def _ct_step(run) -> Callable:
    check_not_learned_sigma(run)
    return make_consistency_train_step(run.model, run.tx, run.lr_fn,
                                       spec=spec_from_config(run.config),
                                       precond=precond_from_config(run.config, True),
                                       consistency_fn=sigma_space_fn(run, True),
                                       **common_step_args(run))


# ---- consistency distillation --------------------------------------------------------

def checked_teacher(run):
    """run.teacher, checked against the student: image shape, classes, noise range."""
    t = getattr(run, "teacher", None)
    if t is None:
        raise ValueError("consistency distillation needs its teacher: set "
                         "consistency.teacher_workdir")
    if tuple(t.image_shape) != tuple(run.image_shape):
        raise ValueError(f"the teacher in {t.workdir} takes images of shape {t.image_shape}, "
                         f"the student {run.image_shape}")
    if t.num_classes != run.num_classes:
        raise ValueError(f"the teacher in {t.workdir} has {t.num_classes} classes, the "
                         f"student conditioning.num_classes={run.num_classes}")
    s = section(run.config)
    bridge.check_sigma_range(t.objective.denoiser(t, None).schedule, float(s.sigma_min),
                             float(s.sigma_max))
    return t


def raw_teacher(t):
    """The teacher with its sampling-only x0 clipping and dynamic thresholding off.

    Those keys of the teacher's `sample` section shape how the teacher draws images, not
    the model: the distillation ODE is the probability-flow ODE of the model itself
    (the official consistency-models code denoises with the raw teacher), and on latents,
    which are not confined to [-1, 1], clipping would bend every teacher step. The
    teacher handed over is left untouched: this is a shallow copy with its own config.
    """
    config = copy.deepcopy(t.config)
    config.sample.clip_x0 = 0.0
    config.sample.dynamic_threshold = 0.0
    raw = copy.copy(t)
    raw.config = config
    return raw


def teacher_fn(run) -> TeacherFn:
    """teacher_x0(params, x_ve, sigma, y): the raw teacher's x0 at VE noise level sigma,
    with classifier-free guidance consistency.teacher_guidance when > 0."""
    t = raw_teacher(checked_teacher(run))
    w = float(section(run.config).teacher_guidance)
    guidance = w if (w > 0 and run.num_classes > 0) else None

    def teacher_x0(params, x_ve, sigma, y):
        den = t.objective.denoiser(t, params)
        return bridge.sigma_space_x0(den, x_ve, sigma, y, guidance)
    return teacher_x0


def _cd_init_aux(run, state):
    # Shapes only: `prepare` fills in the real params on a fresh run.
    t = checked_teacher(run)
    teacher = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), t.params)
    return _target_aux(run, state.replace(aux=dict(state.aux, teacher=teacher)))


def _cd_prepare(run, state):
    t = checked_teacher(run)
    try:
        loaded = t.restore()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the teacher workdir {t.workdir} has no finished "
                                f"checkpoint: train the teacher first ({e})") from None
    log.info("loaded the CD teacher's EMA params from %s (step %d)", t.workdir, loaded.step)
    # Place every tree as the student's state sharding says (replicated, or FSDP).
    shard = run.state_sharding
    teacher = jax.device_put(loaded.params, shard.aux["teacher"])
    aux = dict(state.aux, teacher=teacher)
    if not section(run.config).init_from_teacher:
        return state.replace(aux=aux)
    if not same_shapes(teacher, state.params):
        raise ValueError("consistency.init_from_teacher needs the student network to be "
                         "the teacher's (same model config); they differ")
    _check_same_reading(run, t)
    if "target" in aux:
        aux["target"] = placed_copy(teacher, shard.aux["target"])
    return restart_from(state, teacher, shard, run.tx).replace(aux=aux)


def _check_same_reading(run, t) -> None:
    """A student started from its teacher with consistency.parameterisation='diffusion'
    reads the network's output as its own `diffusion` section says: it must be the
    teacher's, or the start is not the teacher's denoiser."""
    if str(section(run.config).get("parameterisation", "edm")) != "diffusion":
        return
    if t.config.train.objective != "diffusion":
        raise ValueError(f"consistency.parameterisation='diffusion' starts from a teacher "
                         f"trained by objective 'diffusion'; {t.workdir} was trained by "
                         f"{t.config.train.objective!r}")
    for key in ("pred_type", "schedule", "T", "zero_terminal_snr"):
        mine, theirs = run.config.diffusion.get(key), t.config.diffusion.get(key)
        if mine != theirs:
            raise ValueError(f"consistency.parameterisation='diffusion' with "
                             f"init_from_teacher: diffusion.{key}={mine!r} but the teacher's "
                             f"is {theirs!r}; set --config.diffusion.{key}={theirs!r}")


def _cd_step(run) -> Callable:
    check_not_learned_sigma(run)
    return make_consistency_train_step(run.model, run.tx, run.lr_fn,
                                       spec=spec_from_config(run.config),
                                       precond=precond_from_config(run.config, True),
                                       consistency_fn=sigma_space_fn(run, True),
                                       teacher_fn=teacher_fn(run), **common_step_args(run))


CONSISTENCY_TRAINING = Objective(_ct_step, _target_aux, unchanged, sigma_space_denoiser(True))
CONSISTENCY_DISTILLATION = Objective(_cd_step, _cd_init_aux, _cd_prepare,
                                     sigma_space_denoiser(True), teacher=True)
