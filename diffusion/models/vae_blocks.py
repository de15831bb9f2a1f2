"""Building blocks of the KL autoencoder: ResNet block, mid attention, resampling,
and the encoder and decoder stacks.

The layout follows Stable Diffusion's `AutoencoderKL` (as laid out by diffusers), and
submodule names mirror diffusers' state-dict keys with list indices folded into the
name (`down_blocks.0.resnets.1` -> `down_blocks_0/resnets_1`), so the converter in
`diffusion.convert.diffusers_vae` is a mechanical renaming. All tensors are NHWC.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# diffusers builds every GroupNorm of the VAE with eps=1e-6.
NORM_EPS = 1e-6


def group_norm(groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance: the one-pass E[x^2]-E[x]^2 loses precision on activations with
    # large means, which showed up as parity error against PyTorch.
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, dtype=dtype,
                        use_fast_variance=False, name=name)


def conv3x3(features: int, dtype: Dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""
    out_channels: int
    norm_num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = nn.silu(group_norm(self.norm_num_groups, self.dtype, "norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        h = nn.silu(group_norm(self.norm_num_groups, self.dtype, "norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual.

    diffusers' VAE attention has one head whose width is the channel count, dense
    q/k/v/out projections with bias, and a GroupNorm on the input. The softmax runs in
    float32 (diffusers upcasts it too).
    """
    norm_num_groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, hgt, wid, c = x.shape
        h = group_norm(self.norm_num_groups, self.dtype, "group_norm")(x)
        h = h.reshape(b, hgt * wid, c)
        q = nn.Dense(c, dtype=self.dtype, name="to_q")(h)
        k = nn.Dense(c, dtype=self.dtype, name="to_k")(h)
        v = nn.Dense(c, dtype=self.dtype, name="to_v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v)
        h = nn.Dense(c, dtype=self.dtype, name="to_out_0")(h)
        return x + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """3x3 stride-2 conv after padding one row/column at the bottom/right only.

    This asymmetric pad is what SD's VAE was trained with; a symmetric pad would shift
    every feature map by half a pixel and break the ported weights.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID",
                       dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(x.shape[-1], self.dtype, "conv")(x)


class MidBlock(nn.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution."""
    channels: int
    norm_num_groups: int
    attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = ResnetBlock(self.channels, self.norm_num_groups, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = MidAttention(self.norm_num_groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.norm_num_groups, self.dtype, name="resnets_1")(x)


class DownBlock(nn.Module):
    """`num_layers` ResNet blocks, then an optional stride-2 downsample."""
    out_channels: int
    num_layers: int
    norm_num_groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.norm_num_groups, self.dtype,
                            name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample(self.dtype, name="downsamplers_0")(x)
        return x


class UpBlock(nn.Module):
    """`num_layers` ResNet blocks, then an optional 2x upsample."""
    out_channels: int
    num_layers: int
    norm_num_groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.norm_num_groups, self.dtype,
                            name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample(self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, C_in] -> moments [B, H/f, W/f, 2*latent_channels] (pre quant_conv)."""
    latent_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        chans = tuple(self.block_out_channels)
        h = conv3x3(chans[0], self.dtype, "conv_in")(x)
        for i, ch in enumerate(chans):
            h = DownBlock(ch, self.layers_per_block, self.norm_num_groups,
                          add_downsample=i < len(chans) - 1, dtype=self.dtype,
                          name=f"down_blocks_{i}")(h)
        h = MidBlock(chans[-1], self.norm_num_groups, self.mid_attention, self.dtype,
                     name="mid_block")(h)
        h = nn.silu(group_norm(self.norm_num_groups, self.dtype, "conv_norm_out")(h))
        return conv3x3(2 * self.latent_channels, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """Latent [B, h, w, latent] (after post_quant_conv) -> image [B, h*f, w*f, C_out].

    With `return_features=True` also returns the input of `conv_out`, which the
    adversarial loss needs for LDM's adaptive weight.
    """
    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    norm_num_groups: int
    mid_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray, return_features: bool = False):
        chans = tuple(reversed(tuple(self.block_out_channels)))
        h = conv3x3(chans[0], self.dtype, "conv_in")(z)
        h = MidBlock(chans[0], self.norm_num_groups, self.mid_attention, self.dtype,
                     name="mid_block")(h)
        for i, ch in enumerate(chans):
            h = UpBlock(ch, self.layers_per_block + 1, self.norm_num_groups,
                        add_upsample=i < len(chans) - 1, dtype=self.dtype,
                        name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(self.norm_num_groups, self.dtype, "conv_norm_out")(h))
        out = conv3x3(self.out_channels, self.dtype, "conv_out")(h)
        return (out, h) if return_features else out
