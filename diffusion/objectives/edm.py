"""Objective "edm": EDM denoiser training (Karras et al. 2022) in sigma space.

log sigma ~ N(p_mean, p_std^2), loss weight lambda = 1 / c_out^2, the network
preconditioned as in diffusion.consistency.edm. The EDM model (and the consistency
models, which reuse `sigma_space_denoiser`) samples through the VP view of its VE
noise range (`diffusion.consistency.bridge.ve_denoiser`): a Denoiser with pred_type
"x0" that every sampler in diffusion.samplers can drive.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.scipy.stats import norm

from diffusion.consistency import bridge
from diffusion.consistency.edm import NetFn, Precond, denoise, denoise_from_x0, edm_loss
from diffusion.denoiser import Denoiser
from diffusion.objectives.base import Objective, check_not_learned_sigma, unchanged
from diffusion.objectives.consistency_config import (precond_from_config, section,
                                                     ve_schedule_from_config)
from diffusion.train_state import (TrainState, apply_gradients, drop_labels, flat_updates,
                                   loss_buckets, step_metrics)


def flax_net_fn(module, params, *, train: bool = False,
                dropout_key: Optional[jax.Array] = None) -> NetFn:
    """NetFn over a Flax module called as module.apply({'params': p}, x, t, y, train=...)."""
    def net_fn(x, t, y):
        rngs = {"dropout": dropout_key} if (train and dropout_key is not None) else None
        return module.apply({"params": params}, x, t, y, train=train, rngs=rngs)
    return net_fn


def make_edm_train_step(model, tx: optax.GradientTransformation, lr_fn: optax.Schedule, *,
                        precond: Precond, p_mean: float, p_std: float, num_classes: int,
                        label_dropout: float, ema_rate: float, ema_warmup: bool,
                        flat: bool = False) -> Callable:
    """EDM denoiser training; loss buckets are the 4 quartiles of the lognormal sigma."""

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        x0 = batch["image"]
        y = drop_labels(k_label, batch["label"], label_dropout) if num_classes > 0 else None

        def loss_fn(params):
            net = flax_net_fn(model, params, train=True, dropout_key=k_drop)
            d_fn = lambda x, sigma: denoise(net, x, sigma, y, precond)
            per_example, sigma = edm_loss(d_fn, x0, k_loss, p_mean=p_mean, p_std=p_std,
                                          sigma_data=precond.sigma_data)
            return jnp.mean(per_example), (per_example, sigma)

        (loss, (per_example, sigma)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        new_state, decay = apply_gradients(state, grads, tx, ema_rate=ema_rate,
                                           ema_warmup=ema_warmup, flat=flat)
        metrics = step_metrics(state, loss, grads, lr_fn, decay, flat)
        u = norm.cdf((jnp.log(sigma) - p_mean) / p_std)  # equal-probability buckets
        return new_state, dict(metrics, **loss_buckets(per_example, jnp.clip(u, 1e-6, 1.0)))

    return train_step


def common_step_args(run) -> dict:
    """The keyword arguments every sigma-space step takes from the run."""
    c = run.config
    return dict(num_classes=run.num_classes, label_dropout=c.conditioning.label_dropout,
                ema_rate=c.ema.decay, ema_warmup=c.ema.warmup,
                flat=flat_updates(c.optim))


PARAMETERISATIONS = ("edm", "diffusion")


def sigma_space_fn(run, consistency: bool) -> Callable:
    """d(net, x_ve, sigma, y): the sigma-space denoiser (EDM) or consistency function of
    a network net, as consistency.parameterisation says (see consistency_config)."""
    precond = precond_from_config(run.config, consistency)
    kind = str(section(run.config).get("parameterisation", "edm"))
    if kind not in PARAMETERISATIONS:
        raise ValueError(f"unknown consistency.parameterisation {kind!r}; known: "
                         f"{', '.join(PARAMETERISATIONS)}")
    if kind == "edm":
        return lambda net, x, sigma, y: denoise(net, x, sigma, y, precond)
    if not consistency:
        raise ValueError("consistency.parameterisation='diffusion' is for the consistency "
                         "objectives; the EDM objective trains the EDM-preconditioned network")
    pred_type = str(run.config.diffusion.pred_type)

    def d(net, x, sigma, y):
        den = Denoiser(net, run.schedule, pred_type)
        return denoise_from_x0(lambda xx, s: bridge.sigma_space_x0(den, xx, s, y), x, sigma,
                               precond)
    return d


def sigma_space_denoiser(consistency: bool) -> Callable:
    """denoiser(run, params) of a sigma-space network (EDM, or a consistency model)."""
    def make(run, params) -> Denoiser:
        d = sigma_space_fn(run, consistency)
        net = flax_net_fn(run.model, params, train=False)
        clip = run.config.sample.clip_x0 if run.config.sample.clip_x0 > 0 else None
        return bridge.ve_denoiser(lambda x, sigma, y: d(net, x, sigma, y),
                                  ve_schedule_from_config(run.config), clip)
    return make


def _make_step(run) -> Callable:
    check_not_learned_sigma(run)
    s = section(run.config)
    sigma_space_fn(run, False)  # rejects a consistency-only parameterisation
    return make_edm_train_step(run.model, run.tx, run.lr_fn,
                               precond=precond_from_config(run.config, False),
                               p_mean=float(s.p_mean), p_std=float(s.p_std),
                               **common_step_args(run))


EDM = Objective(_make_step, unchanged, unchanged, sigma_space_denoiser(False))
