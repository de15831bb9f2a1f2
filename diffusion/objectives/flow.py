"""Objective "flow": flow matching, a network predicting the path's velocity.

The network (any denoiser of diffusion.models, the default U-Net included) regresses
u = d_alpha x0 + d_sigma eps at continuous times t in [0, 1] on the `flow` section's
path (default: the rectified-flow path alpha = 1 - t, sigma = t, u = eps - x0), with the
time sampling, shift and x0-space weighting of diffusion.flow_matching. It sees
c_noise = T t - 1 as its time input in training and, through the Denoiser (pred_type
"flow" on the same path), in sampling, so any sampler of diffusion.samplers drives it:
flow_euler / flow_midpoint in t, DDIM, DPM-Solver(++) in log-SNR, Heun, ...

`make_flow_train_step(..., coupled=True)` trains on given couplings instead of
independent noise: the batch's "noise" is the eps of each x0 (objective "reflow",
reflow.py). `init_from_workdir` is the `prepare` of both: with `flow.init_workdir`
set, a fresh run starts from that run's EMA parameters (handed over by the layer above
as `run.teacher`, as a CD teacher is).
"""
from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from diffusion import flow_matching
from diffusion.denoiser import Denoiser
from diffusion.objectives.base import Objective, check_not_learned_sigma, unchanged
from diffusion.objectives.flow_config import loss_kwargs, path_from_config, section
from diffusion.paths import GaussianPath
from diffusion.samplers.options import with_dynamic_thresholding
from diffusion.train_state import (TrainState, drop_labels, flat_updates, gradient_step,
                                   restart_from, same_shapes)

log = logging.getLogger(__name__)

PAIRS_HINT = ("objective 'reflow' trains on (sample, noise) pairs: set data.source to "
              "pairs:FILE.npy, written by `python -m diffusion.reflow_pairs --workdir "
              "RUN --out FILE.npy`")


def make_flow_train_step(model, path: GaussianPath, tx: optax.GradientTransformation,
                         lr_fn: optax.Schedule, *, loss_kwargs: dict, coupled: bool,
                         num_classes: int, label_dropout: float, ema_rate: float,
                         ema_warmup: bool, flat: bool = False) -> Callable:
    """Builds train_step(state, batch) for batch = dict(image [B, H, W, C], label [B])
    (+ noise [B, H, W, C], the eps coupled to each image, when `coupled`)."""

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        x0 = batch["image"]
        if coupled and "noise" not in batch:
            raise ValueError(f"the batch has no 'noise': {PAIRS_HINT}")
        eps = batch["noise"] if coupled else None
        y = drop_labels(k_label, batch["label"], label_dropout) if num_classes > 0 else None

        def loss_fn(params):
            def net_fn(x_t, c_noise):
                return model.apply({"params": params}, x_t, c_noise, y, train=True,
                                   rngs={"dropout": k_drop})
            per_example, t = flow_matching.flow_matching_loss(net_fn, path, x0, k_loss,
                                                              eps=eps, **loss_kwargs)
            return jnp.mean(per_example), (per_example, t)

        return gradient_step(state, loss_fn, tx, lr_fn, ema_rate=ema_rate,
                             ema_warmup=ema_warmup, flat=flat)

    return train_step


def step_maker(coupled: bool) -> Callable:
    """make_step(run) of objective "flow" (coupled=False) or "reflow" (True)."""
    def make(run) -> Callable:
        check_not_learned_sigma(run)
        c = run.config
        return make_flow_train_step(
            run.model, path_from_config(c), run.tx, run.lr_fn, loss_kwargs=loss_kwargs(c),
            coupled=coupled, num_classes=run.num_classes,
            label_dropout=c.conditioning.label_dropout, ema_rate=c.ema.decay,
            ema_warmup=c.ema.warmup, flat=flat_updates(c.optim))
    return make


def flow_denoiser(run, params) -> Denoiser:
    """The velocity network as a Denoiser (pred_type "flow") on the section's path."""
    c = run.config

    def net_fn(x, c_noise, y):
        return run.model.apply({"params": params}, x, c_noise, y, train=False)
    clip = c.sample.clip_x0 if c.sample.clip_x0 > 0 else None
    channels = int(c.sample.get("guidance_channels", 0))
    if channels < 0:
        raise ValueError(f"sample.guidance_channels must be >= 0 (0 = all channels), "
                         f"got {channels}")
    denoiser = Denoiser(net_fn, path_from_config(c), "flow", False, clip, channels or None)
    if c.sample.dynamic_threshold > 0:
        denoiser = with_dynamic_thresholding(denoiser, c.sample.dynamic_threshold)
    return denoiser


def init_workdir(config) -> str:
    """flow.init_workdir: the run whose EMA params start a fresh run ("" = none)."""
    return str(section(config).init_workdir)


def init_from_workdir(run, state):
    """prepare: a fresh run starts from run.teacher's EMA params (flow.init_workdir),
    as params and EMA, with a new optimizer state; unchanged without one."""
    t = getattr(run, "teacher", None)
    if t is None:
        return state
    try:
        loaded = t.restore()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"flow.init_workdir={t.workdir} has no finished "
                                f"checkpoint: train that run first ({e})") from None
    if not same_shapes(loaded.params, state.params):
        raise ValueError(f"flow.init_workdir={t.workdir}: its network differs from this "
                         "run's (model config); start from a run of the same model")
    log.info("starting from the EMA params of %s (step %d)", t.workdir, loaded.step)
    return restart_from(state, loaded.params, run.state_sharding, run.tx)


FLOW = Objective(step_maker(coupled=False), unchanged, init_from_workdir, flow_denoiser,
                 init_from=init_workdir)
