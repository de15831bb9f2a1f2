"""The autoencoder's train step: a pure function (state, batch) -> (state, metrics).

One step, for images x [B, H, W, C] in [-1, 1]:
  1. the autoencoder: x_hat = D(z), z ~ q(z|x); minimise
       L_G = rec(x, x_hat) + kl_weight * KL + [step >= disc_start] * lambda * (-mean P(x_hat))
     (diffusion.autoencoder.losses; lambda is LDM's adaptive weight), EMA of its params;
  2. the PatchGAN P, from step disc_start on: minimise the hinge loss on x and on the
     same x_hat (held constant). Before disc_start it is skipped (lax.cond), so its
     optimizer state, learning-rate warm-up included, starts at disc_start.
state.params are the autoencoder's; state.aux = {"disc": params, "disc_opt": optimizer
state} (empty without a discriminator). Metrics include PSNR and SSIM of x_hat on the
batch (x_hat clipped to [-1, 1]).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffusion.autoencoder.losses import (NLayerDiscriminator, vae_discriminator_loss,
                                          vae_generator_loss_and_recon)
from diffusion.autoencoder.metrics import psnr, ssim
from diffusion.models.vae import AutoencoderKL
from diffusion.train_state import TrainState, apply_gradients, grad_norm


def init_discriminator(disc: NLayerDiscriminator, tx: optax.GradientTransformation,
                       key: jax.Array, image_shape: tuple) -> dict:
    """aux for the step: {"disc": params, "disc_opt": tx.init(params)}; call under jit."""
    params = disc.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32))["params"]
    return {"disc": params, "disc_opt": tx.init(params)}


def ssim_window(image_shape: tuple) -> int:
    """SSIM's 11-tap window, shrunk for images smaller than that (tiny test images)."""
    return min(11, int(image_shape[0]), int(image_shape[1]))


def make_vae_train_step(vae: AutoencoderKL, disc: NLayerDiscriminator | None,
                        tx: optax.GradientTransformation, lr_fn: optax.Schedule, *,
                        rec_kind: str = "l1", kl_weight: float = 1e-6,
                        disc_weight: float = 0.5, disc_start: int = 50_001,
                        ema_rate: float = 0.9999, ema_warmup: bool = True,
                        flat: bool = False) -> Callable:
    """train_step(state, batch) for batch = dict(image [B, H, W, C], ...); labels unused.

    tx serves both networks (LDM gives them the same Adam settings); each has its own
    optimizer state.
    """

    def train_step(state: TrainState, batch: dict):
        x = batch["image"]
        key = jax.random.fold_in(state.rng, state.step)
        disc_params = state.aux["disc"] if disc is not None else None
        disc_vars = {"params": disc_params} if disc is not None else None

        def loss_fn(params):
            return vae_generator_loss_and_recon(vae, {"params": params}, disc, disc_vars, x, key,
                                  state.step, rec_kind=rec_kind, kl_weight=kl_weight,
                                  disc_weight=disc_weight, disc_start=disc_start)

        (_, (metrics, x_hat)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, decay = apply_gradients(state, grads, tx, ema_rate=ema_rate,
                                           ema_warmup=ema_warmup, flat=flat)
        aux = state.aux
        if disc is not None:
            new_disc, new_opt, d_metrics = _discriminator_update(
                disc, tx, disc_params, state.aux["disc_opt"], x, x_hat, state.step, disc_start)
            aux = dict(state.aux, disc=new_disc, disc_opt=new_opt)
            metrics.update(d_metrics)
        x_img = jnp.clip(x_hat, -1.0, 1.0)
        metrics.update(
            psnr=jnp.mean(psnr(x, x_img)),
            ssim=jnp.mean(ssim(x, x_img, window_size=ssim_window(x.shape[1:3]))),
            grad_norm=grad_norm(grads, flat), learning_rate=lr_fn(state.step),
            ema_decay=decay)
        return new_state.replace(aux=aux), metrics

    return train_step


def _discriminator_update(disc, tx, disc_params: Any, disc_opt: Any, x: jnp.ndarray,
                          x_hat: jnp.ndarray, step: jnp.ndarray, disc_start: int):
    """One optimizer step of the discriminator once step >= disc_start, else nothing."""

    def update(operands):
        p, opt = operands
        loss_fn = lambda q: vae_discriminator_loss(disc, {"params": q}, x, x_hat, step,
                                                   disc_start=disc_start)
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, m

    def skip(operands):
        p, opt = operands
        zero = jnp.zeros((), jnp.float32)
        return p, opt, {"d_loss": zero, "logits_real": zero, "logits_fake": zero}

    return jax.lax.cond(step >= disc_start, update, skip, (disc_params, disc_opt))
