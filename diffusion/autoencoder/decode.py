"""From latents back to images: decoding sampled latents, and reconstructions x -> x_hat.

A latent diffusion model samples scaled latents z [B, h, w, c] (a LatentSource's
z = scale_factor * mean of the VAE posterior); the VAE decodes them as
x = D(z / scale_factor), images [B, h*f, w*f, C] clipped to [-1, 1]. Which VAE decodes a
run's samples is its config's `latent` section, resolved by diffusion.pretrained.load_vae.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(vae, params: Any, z: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """Scaled latents z [B, h, w, c] -> images [B, h*f, w*f, C] in [-1, 1]."""
    x = vae.apply({"params": params}, z / scale, method="decode")
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(vae, params: Any, x: jnp.ndarray) -> jnp.ndarray:
    """x_hat [B, H, W, C] in [-1, 1]: x [B, H, W, C] through the posterior mean (no
    sampling) and back."""
    x_hat, _, _ = vae.apply({"params": params}, x)
    return jnp.clip(x_hat, -1.0, 1.0)


def check_latent_channels(vae, latent_channels: int, what: str) -> None:
    """A clear error when the VAE cannot decode latents with `latent_channels`."""
    if vae.latent_channels != latent_channels:
        raise ValueError(f"the VAE has {vae.latent_channels} latent channels but {what} "
                         f"has {latent_channels}")


def decoding(sample_fn: Callable, vae, vae_params: Any, scale: float) -> Callable:
    """sample_fn(params, key, *args) -> latents, turned into a function with the same
    arguments that returns their decoded images."""
    scale = jnp.float32(scale)

    def fn(params, key, *args):
        return decode_latents(vae, vae_params, sample_fn(params, key, *args), scale)
    return fn
