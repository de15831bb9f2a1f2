"""Building blocks of the DDPM/ADM U-Net: residual blocks, self-attention, resampling.

All blocks act on feature maps h: [B, H, W, C] (NHWC). Parameters are float32; `dtype`
sets the activation dtype. Initialisation follows DDPM: fan-avg uniform variance scaling
everywhere, and zero init for the last conv of each residual branch, so every block
starts as the identity.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.attention import Attention

# DDPM's default_init(scale=1): variance_scaling(1, 'fan_avg', 'uniform').
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros

# DDPM's TF group_norm epsilon.
NORM_EPS = 1e-6


def num_groups(channels: int, max_groups: int = 32) -> int:
    """Group count for GroupNorm: 32 at real widths (>= 64 channels).

    Narrow test widths fall back to the largest divisor of `channels` that leaves at
    least 2 channels per group: with one channel per group the per-channel time
    embedding added before the norm would be subtracted out again.
    """
    g = max(1, min(max_groups, channels // 2))
    while channels % g:
        g -= 1
    return g


def group_norm(channels: int, dtype: jnp.dtype, name: str) -> nn.GroupNorm:
    # flax computes the statistics in float32 even for bf16 inputs.
    return nn.GroupNorm(num_groups=num_groups(channels), epsilon=NORM_EPS, dtype=dtype,
                        name=name)


def conv3x3(features: int, dtype: jnp.dtype, name: str, zero: bool = False,
            strides: int = 1) -> nn.Conv:
    # 'SAME' with stride 2 pads (0, 1) on even sizes, as DDPM's TF conv does.
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding="SAME",
                   kernel_init=zero_init if zero else default_init, dtype=dtype, name=name)


def downsample_avg(h: jnp.ndarray) -> jnp.ndarray:
    """2x2 average pooling: [B, H, W, C] -> [B, H/2, W/2, C]."""
    B, H, W, C = h.shape
    return h.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


def upsample_nearest(h: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour 2x upsampling: [B, H, W, C] -> [B, 2H, 2W, C]."""
    return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + embedding, GroupNorm-SiLU-dropout-conv, + skip.

    `emb` is the already SiLU-activated conditioning vector [B, E]. With
    scale_shift_norm (ADM) the embedding gives (scale, shift) applied after the second
    norm instead of being added. `up`/`down` (ADM's resblock_updown) resample both the
    residual branch (between the first norm and conv) and the skip path.
    """
    out_ch: int
    dropout: float = 0.0
    scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        in_ch = x.shape[-1]
        h = nn.silu(group_norm(in_ch, self.dtype, "norm1")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = conv3x3(self.out_ch, self.dtype, "conv1")(h)

        n_emb = 2 * self.out_ch if self.scale_shift_norm else self.out_ch
        e = nn.Dense(n_emb, kernel_init=default_init, dtype=self.dtype, name="temb_proj")(emb)
        e = e[:, None, None, :]
        h = group_norm(self.out_ch, self.dtype, "norm2")(h if self.scale_shift_norm else h + e)
        if self.scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = h * (1 + scale) + shift
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.out_ch, self.dtype, "conv2", zero=True)(h)

        if in_ch != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), kernel_init=default_init, dtype=self.dtype,
                        name="skip")(x)
        return x + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""
    num_heads: int = 1
    dtype: jnp.dtype = jnp.float32
    # None = XLA everywhere; 'cudnn' = fused flash attention on NVIDIA GPUs (needs bf16
    # or fp16 activations and head_dim a multiple of 8, at most 128).
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        B, H, W, C = x.shape
        if C % self.num_heads:
            raise ValueError(f"attention: {self.num_heads} heads do not divide {C} channels")
        head_dim = C // self.num_heads
        h = group_norm(C, self.dtype, "norm")(x)
        qkv = nn.Dense(3 * C, kernel_init=default_init, dtype=self.dtype, name="qkv")(h)
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        h = h.reshape(B, H, W, C)
        h = nn.Dense(C, kernel_init=zero_init, dtype=self.dtype, name="proj_out")(h)
        return x + h


class CrossAttnBlock(nn.Module):
    """Attention of the H*W positions of x [B, H, W, C] (GroupNorm'd) to context
    tokens [B, L, D], with a residual connection. The output projection starts at
    zero, so a network gains the block without changing its initial function."""
    num_heads: int = 1
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        B, H, W, C = x.shape
        if C % self.num_heads:
            raise ValueError(f"cross-attention: {self.num_heads} heads do not divide {C} "
                             f"channels")
        h = group_norm(C, self.dtype, "norm")(x).reshape(B, H * W, C)
        h = Attention(self.num_heads, C // self.num_heads, self.dtype, self.implementation,
                      zero_out=True, name="attn")(h, context.astype(self.dtype))
        return x + h.reshape(B, H, W, C)


class Downsample(nn.Module):
    """DDPM's learned 2x downsampling: 3x3 conv with stride 2."""
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return conv3x3(x.shape[-1], self.dtype, "conv", strides=2)(x)


class Upsample(nn.Module):
    """DDPM's 2x upsampling: nearest neighbour, then 3x3 conv."""
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return conv3x3(x.shape[-1], self.dtype, "conv")(upsample_nearest(x))
