"""The KL autoencoder as the trainer sees it: `AutoencoderKL` with the denoisers' call
signature, so the shared initialisation (`model.init(x, t, y, train=False)` in
diffusion.train.state) builds its parameters like any other network's.

Its parameter tree is exactly AutoencoderKL's, so its params work with a plain
AutoencoderKL (and its `encode` / `decode` methods) and with the diffusers converter.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion.models.vae import AutoencoderKL


class TrainableAutoencoderKL(AutoencoderKL):
    """AutoencoderKL whose __call__ also accepts (and ignores) t, y and train.

    Returns (x_hat, mean, logvar) [+ decoder features], as AutoencoderKL does.
    """

    def __call__(self, x: jnp.ndarray, t: jnp.ndarray | None = None,
                 y: jnp.ndarray | None = None, train: bool = False, *,
                 sample_posterior: bool = False, return_features: bool = False):
        del t, y, train  # an autoencoder has no noise level, label or dropout
        return super().__call__(x, sample_posterior=sample_posterior,
                                return_features=return_features)
