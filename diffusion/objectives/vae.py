"""Objective "vae": the KL autoencoder of latent diffusion, trained with LDM's loss
(diffusion.autoencoder.train_step) through the same loop, checkpoints and launch.py.

    model.name = "vae"   hyperparameters in model.vae, in/out channels from the data
    vae_loss.*           reconstruction kind, KL weight, PatchGAN and its start step
    optim, ema           shared with the discriminator / the autoencoder's EMA

state.params / ema_params are the autoencoder's, state.aux holds the discriminator and
its optimizer state. Instead of sample grids, the loop writes reconstructions of a fixed
batch (the first sample.num_samples examples): rows of originals, each followed by a
row of their reconstructions from the posterior mean (`visualize`).
"""
from __future__ import annotations

import math

import jax
import numpy as np

from diffusion import images, parallel
from diffusion.autoencoder.decode import reconstruct
from diffusion.autoencoder.losses import NLayerDiscriminator
from diffusion.autoencoder.train_step import init_discriminator, make_vae_train_step
from diffusion.models import DTYPES
from diffusion.objectives.base import Objective, unchanged
from diffusion.train_state import flat_updates


def _check(run) -> None:
    c = run.config
    if c.model.name != "vae":
        raise ValueError(f"train.objective 'vae' trains the KL autoencoder: set "
                         f"model.name='vae' (got {c.model.name!r})")
    if c.vae_loss.rec_kind not in ("l1", "l2"):
        raise ValueError(f"unknown vae_loss.rec_kind {c.vae_loss.rec_kind!r}: 'l1' or 'l2'")


def patchgan_logit_size(size: int, n_layers: int) -> int:
    """Side of the PatchGAN's logit map for images of side `size` (4x4 convs, pad 1)."""
    size = (size - 2) // 2 + 1                 # conv_0, stride 2
    for _ in range(1, n_layers):
        size = (size - 2) // 2 + 1             # stride-2 convs
    return size - 2                            # the stride-1 conv and conv_out


def discriminator(run) -> NLayerDiscriminator | None:
    """The PatchGAN of the run's config (None when vae_loss.disc is off)."""
    v = run.config.vae_loss
    if not v.disc:
        return None
    if v.disc_norm not in ("group", "none"):
        raise ValueError(f"unknown vae_loss.disc_norm {v.disc_norm!r}: 'group' or 'none'")
    h, w, _ = run.image_shape
    if patchgan_logit_size(min(h, w), v.disc_layers) < 1:
        raise ValueError(f"vae_loss.disc_layers={v.disc_layers} leaves no logits for "
                         f"{h}x{w} images; use fewer layers")
    return NLayerDiscriminator(base_channels=v.disc_channels, n_layers=v.disc_layers,
                               norm=v.disc_norm, dtype=DTYPES[run.config.model.dtype])


def _make_step(run):
    _check(run)
    c = run.config
    return make_vae_train_step(
        run.model, discriminator(run), run.tx, run.lr_fn, rec_kind=c.vae_loss.rec_kind,
        kl_weight=c.vae_loss.kl_weight, disc_weight=c.vae_loss.disc_weight,
        disc_start=int(c.vae_loss.disc_start), ema_rate=c.ema.decay, ema_warmup=c.ema.warmup,
        flat=flat_updates(c.optim))


def _init_aux(run, state):
    _check(run)
    disc = discriminator(run)
    if disc is None:
        return state
    k_disc, rng = jax.random.split(state.rng)
    aux = init_discriminator(disc, run.tx, k_disc, run.image_shape)
    return state.replace(rng=rng, aux=dict(state.aux, **aux))


def _no_denoiser(run, params):
    raise ValueError("train.objective 'vae' trains an autoencoder, which has no sampler; "
                     "its reconstructions are written to <workdir>/samples during training. "
                     "Use its workdir as latent.vae_workdir of a latent diffusion run.")


def fixed_images(source, n: int, image_shape: tuple) -> np.ndarray:
    """The first n examples of `source` as float32 [n, H, W, C] in [-1, 1]."""
    size = tuple(image_shape[:2])
    idx = np.arange(min(n, len(source)))
    x = source.get(idx, None if tuple(source.image_shape[:2]) == size else size)["image"]
    return x.astype(np.float32) / 127.5 - 1.0


def paired_grid_images(x: np.ndarray, x_hat: np.ndarray) -> tuple[np.ndarray, int]:
    """Interleaves rows of originals and of their reconstructions: ([2R*k, H, W, C], k)
    with k = ceil(sqrt(n)) images per row and short rows padded with black."""
    n = len(x)
    k = math.ceil(math.sqrt(n))
    pad = (-n) % k
    blank = -np.ones((pad,) + x.shape[1:], np.float32)
    x, x_hat = np.concatenate([x, blank]), np.concatenate([np.asarray(x_hat), blank])
    rows = [part[r:r + k] for r in range(0, len(x), k) for part in (x, x_hat)]
    return np.concatenate(rows), k


def _visualize(run, state) -> dict[str, np.ndarray]:
    """{tag: uint8 grid}: a fixed batch and its reconstructions by the EMA and raw params."""
    x = fixed_images(run.source, int(run.config.sample.num_samples), run.image_shape)
    x_dev = jax.device_put(x, parallel.replicated(run.mesh))
    out = {}
    for tag, params in (("reconstructions_ema", state.ema_params),
                        ("reconstructions_raw", state.params)):
        x_hat = parallel.to_host(reconstruct(run.model, params, x_dev))
        tiles, k = paired_grid_images(x, x_hat)
        out[tag] = images.make_grid(tiles, nrow=k)
    return out


VAE = Objective(_make_step, _init_aux, unchanged, _no_denoiser, _visualize)
