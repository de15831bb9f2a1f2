"""A latent run's samples as images: its sample function followed by its VAE's decoder.

A model trained on `data.source = "latents:<dir>"` (a LatentSource) samples latents;
sampling in the training loop, the sampler benchmark and evaluation decode them right
after each sampling call with the VAE the config's `latent` section names
(latent.vae_workdir: a VAE trained here; latent.vae_weights: diffusers weights), loaded
once by diffusion.pretrained.load_vae, and the latent dataset's own scale factor.
Pixel-space runs set neither key and sample exactly as before.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from diffusion.autoencoder.decode import check_latent_channels, decoding
from diffusion.data.latents import LatentSource
from diffusion.pretrained import latent_vae_path, load_vae

log = logging.getLogger(__name__)


def decoding_sample_fn(run, sample_fn: Callable) -> Callable:
    """sample_fn(params, key, offset, guidance) -> images: latents decoded for a latent
    run, `sample_fn` itself for a pixel run. `run` carries config, source, image_shape
    and mesh (a training Run)."""
    named = latent_vae_path(run.config.latent)
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
    path, is_workdir = named
    vae, vae_params, _ = load_vae(path, is_workdir=is_workdir,
                                     devices=list(run.mesh.devices.flat))
    check_latent_channels(vae, run.image_shape[-1],
                          f"the latent dataset {run.source.out_dir}")
    recorded = run.source.manifest.get("info", {}).get("vae")
    if recorded and os.path.abspath(recorded) != os.path.abspath(path):
        log.warning("the latents in %s were encoded with %s, but samples are decoded with %s",
                    run.source.out_dir, recorded, os.path.abspath(path))
    return decoding(sample_fn, vae, vae_params, run.source.scale_factor)
