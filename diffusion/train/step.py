"""The train step: a pure function (state, batch) -> (state, metrics).

It is compiled once by the loop with shardings and the state donated. Randomness comes
from fold_in(state.rng, step), so a run is reproducible and resumes bit-for-bit, and
the values drawn do not depend on how the batch is split across devices.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from diffusion import losses
from diffusion.schedules import Schedule
from diffusion.train.state import TrainState, ema_decay, ema_update

NUM_LOSS_BUCKETS = 4


def drop_labels(key: jax.Array, y: jnp.ndarray, p: float) -> jnp.ndarray:
    """Replaces each label by the null label (-1) with probability p (for CFG)."""
    if p <= 0:
        return y
    return jnp.where(jax.random.uniform(key, y.shape) < p, -1, y)


def make_train_step(model, schedule: Schedule, tx: optax.GradientTransformation,
                    lr_fn: optax.Schedule, *, pred_type: str, weighting: str,
                    min_snr_gamma: float, time_sampling: str, discrete_time: bool,
                    learned_sigma: bool, vlb_weight: float, num_classes: int,
                    label_dropout: float, ema_rate: float, ema_warmup: bool) -> Callable:
    """Builds train_step(state, batch) for batch = dict(image [B,H,W,C], label [B])."""

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        x0 = batch["image"]
        y = drop_labels(k_label, batch["label"], label_dropout) if num_classes > 0 else None

        def loss_fn(params):
            def net_fn(x_t, c_noise):
                return model.apply({"params": params}, x_t, c_noise, y, train=True,
                                   rngs={"dropout": k_drop})
            per_example, t = losses.diffusion_loss(
                net_fn, schedule, x0, k_loss, pred_type=pred_type, weighting=weighting,
                min_snr_gamma=min_snr_gamma, time_sampling=time_sampling,
                discrete_time=discrete_time, learned_sigma=learned_sigma,
                vlb_weight=vlb_weight)
            return jnp.mean(per_example), (per_example, t)

        (loss, (per_example, t)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step, ema_rate, ema_warmup)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, decay))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": lr_fn(state.step), "ema_decay": decay}
        buckets = losses.bucket_means(per_example, t, NUM_LOSS_BUCKETS)
        for b in range(NUM_LOSS_BUCKETS):
            metrics[f"loss_t{b}"] = buckets[b]
        return new_state, metrics

    return train_step
