"""KL-regularised autoencoder (Stable Diffusion's `AutoencoderKL`) for latent diffusion.

x [B, H, W, C] in [-1, 1]  --encode-->  mean, logvar [B, H/f, W/f, latent_channels]
z [B, H/f, W/f, latent]    --decode-->  x_hat [B, H, W, C]

with f = 2 ** (len(block_out_channels) - 1). The latent scale (`scaling_factor`, 0.18215
for SD's VAE) is not a parameter: it is a float stored next to the weights and applied
by whoever feeds latents to a diffusion model (z_diffusion = scale * z_vae).
`estimate_scale_factor` measures it from data as 1 / std(latents).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models.vae_blocks import Decoder, Encoder

Dtype = Any

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class AutoencoderKL(nn.Module):
    """Encoder/decoder pair with a diagonal Gaussian posterior q(z|x).

    Attributes:
      in_channels / out_channels: image channels.
      latent_channels: channels of z.
      block_out_channels: width per resolution level; its length sets the number of
        2x down/upsamplings (length - 1).
      layers_per_block: ResNet blocks per encoder level (decoder levels get one more).
      norm_num_groups: GroupNorm groups; must divide every width.
      mid_attention: self-attention in the mid blocks.
      use_quant_conv / use_post_quant_conv: the 1x1 convs around the latent (SD: both).
      dtype: activation dtype; parameters stay float32.
    """
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    dtype: Dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self):
        chans = tuple(self.block_out_channels)
        if not chans:
            raise ValueError("block_out_channels must not be empty")
        for ch in chans:
            if ch % self.norm_num_groups:
                raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide "
                                 f"block width {ch} (block_out_channels={chans})")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        self.encoder = Encoder(self.latent_channels, chans, self.layers_per_block,
                               self.norm_num_groups, self.mid_attention, self.dtype)
        self.decoder = Decoder(self.out_channels, chans, self.layers_per_block,
                               self.norm_num_groups, self.mid_attention, self.dtype)
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    def _check_image(self, x: jnp.ndarray) -> None:
        f = self.downsample_factor
        if x.ndim != 4:
            raise ValueError(f"expected images [B, H, W, C], got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"image has {x.shape[-1]} channels, the VAE expects "
                             f"in_channels={self.in_channels} (NHWC layout)")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"downsampling factor {f} does not divide image size "
                             f"{x.shape[1]}x{x.shape[2]}")

    def encode(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x [B, H, W, C_in] -> (mean, logvar), each [B, H/f, W/f, latent], float32."""
        self._check_image(x)
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jnp.ndarray, return_features: bool = False):
        """z [B, h, w, latent] (unscaled VAE latent) -> image [B, h*f, w*f, C_out].

        With `return_features`, returns (image, input of decoder.conv_out).
        """
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"expected latents [B, h, w, {self.latent_channels}], "
                             f"got shape {z.shape}")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z, return_features=return_features)

    def __call__(self, x: jnp.ndarray, sample_posterior: bool = False,
                 return_features: bool = False):
        """Reconstruct x. Returns (x_hat, mean, logvar) [+ decoder features].

        With `sample_posterior`, z = mean + exp(logvar / 2) * eps with eps drawn from
        the 'sample' rng stream (`rngs={'sample': key}`); otherwise z = mean.
        """
        mean, logvar = self.encode(x)
        z = mean
        if sample_posterior:
            eps = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
            z = mean + jnp.exp(0.5 * logvar) * eps
        out = self.decode(z, return_features=return_features)
        if return_features:
            x_hat, feats = out
            return x_hat, mean, logvar, feats
        return out, mean, logvar


def estimate_scale_factor(encode_fn: Callable[[Any], Any], batches: Iterable[Any],
                          seed: int | None = None) -> float:
    """1 / std of the latents over `batches` (LDM's rule for `scaling_factor`).

    encode_fn maps a batch (whatever `batches` yields; a dict batch is passed as its
    'image' entry) to latents, or to (mean, logvar). For (mean, logvar), latents are
    posterior samples drawn with numpy from `seed` when given (as in LDM), else the
    means. The std is over all latent entries, pooled across batches (streaming sums
    in float64).
    """
    rng = None if seed is None else np.random.default_rng(seed)
    count, total, total_sq = 0, 0.0, 0.0
    for batch in batches:
        if isinstance(batch, dict):
            batch = batch["image"]
        out = encode_fn(batch)
        if isinstance(out, (tuple, list)):
            mean, logvar = out
            z = np.asarray(mean, np.float64)
            if rng is not None:
                std = np.exp(0.5 * np.asarray(logvar, np.float64))
                z = z + std * rng.standard_normal(z.shape)
        else:
            z = out
        z = np.asarray(z, dtype=np.float64)
        count += z.size
        total += z.sum()
        total_sq += np.square(z).sum()
    if count < 2:
        raise ValueError("estimate_scale_factor got no latents (empty batches)")
    mu = total / count
    var = (total_sq - count * mu * mu) / (count - 1)
    if not var > 0:
        raise ValueError(f"latents have zero variance (var={var}); cannot set a scale")
    return float(1.0 / np.sqrt(var))
