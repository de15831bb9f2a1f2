"""Latent diffusion: the autoencoder that turns sampled latents back into images.

A model trained on `data.source = "latents:<dir>"` (a LatentSource, whose latents are
z = scale_factor * mean of the VAE posterior) samples latents [B, h, w, c]. Sampling
in the loop and in the `sample` mode decodes them right after each sampling call:
x = VAE.decode(z / scale_factor), images [B, h*f, w*f, C] clipped to [-1, 1]. The
VAE comes from the config, loaded once (and cached) per run:

  latent.vae_workdir   a workdir of train.objective "vae": its config.json and the
                       EMA params of its newest checkpoint;
  latent.vae_weights   a diffusers-format VAE folder or weight file (e.g. SD's
                       sd-vae-ft-ema), via diffusion.convert.diffusers_vae.

scale_factor is the latent dataset's own (its manifest), the one its latents carry.
Pixel-space runs set neither key and sample exactly as before.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from diffusion import parallel
from diffusion.latents import LatentSource
from diffusion.train.setup import read_run_config

log = logging.getLogger(__name__)


def load_vae_workdir(workdir: str, devices=None) -> tuple[Any, Any]:
    """(module, EMA params) of the newest checkpoint of a "vae" training run, the params
    replicated over `devices` (default: all)."""
    from diffusion.train.setup import build_run  # setup imports the objective registry
    workdir = os.path.abspath(workdir)
    config = read_run_config(workdir)
    if config.train.objective != "vae":
        raise ValueError(f"{workdir} is a run of train.objective "
                         f"{config.train.objective!r}, not a VAE ('vae')")
    devices = list(jax.devices() if devices is None else devices)
    # Only the parameter shapes matter here: any batch size the mesh divides will do.
    config.data.global_batch_size = len(devices)
    run = build_run(config, workdir, devices)
    try:
        if run.checkpointer.latest_step() is None:
            raise FileNotFoundError(f"the VAE workdir {workdir} has no finished checkpoint: "
                                    "train the VAE first")
        state, _ = run.checkpointer.restore(run.abstract_state)
    finally:
        run.checkpointer.close()
    return run.model, state.ema_params


def load_vae(latent: ml_collections.ConfigDict, devices=None) -> tuple[Any, Any] | None:
    """(module, params) named by a config's `latent` section, or None when it names none.

    Cached: the sample grids, the `sample` mode and the in-training evaluation of one
    run share one copy (a new checkpoint in the VAE's workdir is a new cache entry)."""
    workdir, weights = latent.vae_workdir, latent.vae_weights
    if workdir and weights:
        raise ValueError("set only one of latent.vae_workdir and latent.vae_weights")
    if not (workdir or weights):
        return None
    path = os.path.abspath(workdir or weights)
    ckpts = os.path.join(path, "checkpoints")
    stamp = os.path.getmtime(ckpts) if workdir and os.path.isdir(ckpts) else 0.0
    devices = tuple(jax.devices() if devices is None else devices)
    return _load_vae_cached(path, bool(workdir), devices, stamp)


@functools.lru_cache(maxsize=2)
def _load_vae_cached(path: str, is_workdir: bool, devices: tuple, stamp: float):
    del stamp  # only part of the cache key
    if is_workdir:
        return load_vae_workdir(path, list(devices))
    from diffusion.convert.diffusers_vae import load_sd_vae
    module, params, _ = load_sd_vae(path)
    mesh = parallel.make_mesh(list(devices))
    return module, jax.device_put(params, parallel.replicated(mesh))


@functools.partial(jax.jit, static_argnums=0)
def decode_latents(vae, params, z: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """Scaled latents z [B, h, w, c] -> images [B, h*f, w*f, C] in [-1, 1]."""
    x = vae.apply({"params": params}, z / scale, method="decode")
    return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def decoding_sample_fn(run, sample_fn: Callable) -> Callable:
    """sample_fn(params, key, offset, guidance) -> images: latents decoded for a latent
    run, `sample_fn` itself for a pixel run."""
    latent = run.config.latent
    named = bool(latent.vae_workdir or latent.vae_weights)
    if not isinstance(run.source, LatentSource):
        if named:
            raise ValueError(f"latent.vae_workdir / latent.vae_weights are set but "
                             f"data.source {run.config.data.source!r} is not a latent "
                             "dataset ('latents:<dir>'); clear them for a pixel-space run")
        return sample_fn
    if not named:
        log.warning("data.source is a latent dataset but no VAE is configured "
                    "(latent.vae_workdir / latent.vae_weights): sampling will fail")

        def no_vae(*args):
            raise ValueError("cannot turn sampled latents into images: set "
                             "latent.vae_workdir (a VAE trained here) or latent.vae_weights "
                             "(a diffusers VAE), or train.sample_every=0")
        return no_vae
    if run.config.sample.clip_x0 > 0:
        log.warning("sample.clip_x0=%s clips latents to [-1, 1]; latent models usually "
                    "sample with sample.clip_x0=0", run.config.sample.clip_x0)
    vae, vae_params = load_vae(latent, list(run.mesh.devices.flat))
    if vae.latent_channels != run.image_shape[-1]:
        raise ValueError(f"the VAE has {vae.latent_channels} latent channels but the latent "
                         f"dataset {run.source.out_dir} has {run.image_shape[-1]}")
    recorded = run.source.manifest.get("info", {}).get("vae")
    source = os.path.abspath(latent.vae_workdir or latent.vae_weights)
    if recorded and os.path.abspath(recorded) != source:
        log.warning("the latents in %s were encoded with %s, but samples are decoded with %s",
                    run.source.out_dir, recorded, source)
    scale = jnp.float32(run.source.scale_factor)

    def fn(params, key, sample_offset, guidance):
        return decode_latents(vae, vae_params, sample_fn(params, key, sample_offset, guidance),
                              scale)
    return fn
