"""Conditioning embeddings shared by the denoisers: noise level and class label.

The U-Net (DDPM/ADM) and DiT both embed the noise-conditioning scalar `t` with
sinusoids followed by a two-layer MLP, and labels with a table that has one extra row
for the null class used by classifier-free guidance.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0,
                       cos_first: bool = False, freq_shift: float = 0.0) -> jnp.ndarray:
    """Sinusoidal features of t: [B] -> [B, dim], in float32.

    Frequencies are max_period ** (-k / (half - freq_shift)), k = 0..half-1. DDPM uses
    [sin, cos] with freq_shift=1; DiT uses [cos, sin] with freq_shift=0, which matters
    when loading its published weights.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects t of shape [B], got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                    / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(args), jnp.sin(args)] if cos_first else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepMLP(nn.Module):
    """t [B] -> sinusoid(freq_dim) -> Dense(hidden) -> SiLU -> Dense(hidden)."""
    freq_dim: int
    hidden: int
    cos_first: bool = False
    freq_shift: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        emb = timestep_embedding(t, self.freq_dim, cos_first=self.cos_first,
                                 freq_shift=self.freq_shift)
        emb = nn.Dense(self.hidden, dtype=self.dtype, name="dense0")(emb)
        emb = nn.Dense(self.hidden, dtype=self.dtype, name="dense1")(nn.silu(emb))
        return emb


def null_labels(y: jnp.ndarray, num_classes: int) -> jnp.ndarray:
    """Maps any negative label to the null class index `num_classes`."""
    y = y.astype(jnp.int32)
    return jnp.where(y < 0, num_classes, y)


class LabelEmbedding(nn.Module):
    """Class labels [B] -> [B, hidden]; row `num_classes` is the null class."""
    num_classes: int
    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jnp.ndarray) -> jnp.ndarray:
        table = nn.Embed(self.num_classes + 1, self.hidden,
                         embedding_init=nn.initializers.normal(0.02), name="table")
        return table(null_labels(y, self.num_classes)).astype(self.dtype)
