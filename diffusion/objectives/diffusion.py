"""Objective "diffusion": eps / x0 / v prediction under a VP schedule (DDPM, iDDPM, DiT).

The train step is a pure function (state, batch) -> (state, metrics), compiled once by
the loop with shardings and the state donated. Randomness comes from
fold_in(state.rng, step), so a run is reproducible and resumes bit-for-bit, and the
values drawn do not depend on how the batch is split across devices.

A text-conditional model (models.text_conditional) takes the batch's caption token ids
as its y, each replaced by the empty prompt's with probability caption_dropout; its
Denoiser reads the condition of `encode_prompts` and guides from the negative prompt.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion import losses
from diffusion.denoiser import Denoiser
from diffusion.models.text_conditional import TextConditional, denoise_fn, negative_condition
from diffusion.objectives.base import Objective, unchanged
from diffusion.samplers.options import with_dynamic_thresholding
from diffusion.schedules import Schedule
from diffusion.train_state import TrainState, drop_labels, flat_updates, gradient_step


def make_train_step(model, schedule: Schedule, tx: optax.GradientTransformation,
                    lr_fn: optax.Schedule, *, pred_type: str, weighting: str,
                    min_snr_gamma: float, time_sampling: str, discrete_time: bool,
                    learned_sigma: bool, vlb_weight: float, num_classes: int,
                    label_dropout: float, ema_rate: float, ema_warmup: bool,
                    flat: bool = False, null_tokens: Optional[np.ndarray] = None,
                    caption_dropout: float = 0.0, caption_key: str = "tokens") -> Callable:
    """Builds train_step(state, batch) for batch = dict(image [B,H,W,C], label [B]),
    plus tokens [B, L] for a text-conditional model (null_tokens [L]: the empty
    prompt's ids, which replace a caption with probability caption_dropout), or with
    caption_key="context" cached embeddings [B, L, D] (null_tokens: the empty prompt's
    embeddings [L, D])."""

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        x0 = batch["image"]
        y = drop_labels(k_label, batch["label"], label_dropout) if num_classes > 0 else None
        if null_tokens is not None:
            y = drop_labels(k_label, batch[caption_key], caption_dropout, null_tokens)

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

        return gradient_step(state, loss_fn, tx, lr_fn, ema_rate=ema_rate,
                             ema_warmup=ema_warmup, flat=flat)

    return train_step


def _make_step(run) -> Callable:
    c = run.config
    caption_key, null = "tokens", None
    if isinstance(run.model, TextConditional):  # cached embeddings, else token ids
        cached = getattr(run.source, "null_context", None)
        caption_key, null = (("context", cached) if cached is not None
                             else ("tokens", run.source.null_tokens))
    return make_train_step(
        run.model, run.schedule, run.tx, run.lr_fn, pred_type=c.diffusion.pred_type,
        weighting=c.diffusion.weighting, min_snr_gamma=c.diffusion.min_snr_gamma,
        time_sampling=c.diffusion.time_sampling, discrete_time=c.diffusion.discrete_time,
        learned_sigma=c.diffusion.learned_sigma, vlb_weight=c.diffusion.vlb_weight,
        num_classes=run.num_classes, label_dropout=c.conditioning.label_dropout,
        ema_rate=c.ema.decay, ema_warmup=c.ema.warmup, flat=flat_updates(c.optim),
        null_tokens=null, caption_dropout=float(c.conditioning.get("caption_dropout", 0.0)),
        caption_key=caption_key)


def diffusion_denoiser(run, params) -> Denoiser:
    """The denoiser of a network trained by the plain diffusion objective."""
    c = run.config

    def net_fn(x, c_noise, y):
        return run.model.apply({"params": params}, x, c_noise, y, train=False)
    uncond_fn = None
    if isinstance(run.model, TextConditional):  # y: a condition of encode_prompts
        net_fn, uncond_fn = denoise_fn(run.model, params), negative_condition
    clip = c.sample.clip_x0 if c.sample.clip_x0 > 0 else None
    # Official DiT guides 3 of its 4 latent channels (sample.guidance_channels=3).
    channels = int(c.sample.get("guidance_channels", 0))
    if channels < 0:
        raise ValueError(f"sample.guidance_channels must be >= 0 (0 = all channels), "
                         f"got {channels}")
    denoiser = Denoiser(net_fn, run.schedule, c.diffusion.pred_type,
                        c.diffusion.learned_sigma, clip, channels or None, uncond_fn)
    if c.sample.dynamic_threshold > 0:
        denoiser = with_dynamic_thresholding(denoiser, c.sample.dynamic_threshold)
    return denoiser


DIFFUSION = Objective(_make_step, unchanged, unchanged, diffusion_denoiser)
