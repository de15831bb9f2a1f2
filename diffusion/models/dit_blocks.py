"""Building blocks of the DiT denoiser (Peebles & Xie 2023): adaLN-Zero transformer block,
final layer, timestep embedding with DiT's initialisation, and the fixed 2-D sin-cos
position embedding.

Tokens are [B, T, D] with T = (H / p) * (W / p) patches in row-major order and D the
hidden size. Parameter names mirror the official PyTorch modules so that the converter
(diffusion/convert/dit_official.py) is a plain renaming plus transposes.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models.attention import Attention
from diffusion.models.embeddings import timestep_embedding

# Every Dense of DiT starts as xavier-uniform with zero bias; the adaLN and output
# layers are then zeroed, which makes each block the identity and the network output 0.
xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """pos [M] -> [M, dim] as [sin(pos * omega), cos(pos * omega)], omega = 1e4^(-k/(dim/2))."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = pos.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=32)
def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed position embedding [grid_size**2, dim] for a square grid of patches, row-major.

    Same values as the official get_2d_sincos_pos_embed: the first dim/2 channels encode
    the column (w) index and the last dim/2 the row (h) index (its meshgrid puts w first).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs hidden size divisible by 4, "
                         f"got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    emb = emb.astype(np.float32)
    emb.setflags(write=False)  # cached: callers must not mutate it
    return emb


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """adaLN: x [B, T, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(dtype: jnp.dtype, name: str) -> nn.LayerNorm:
    # No affine: adaLN supplies scale and shift. Statistics are reduced in float32.
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiTTimestepEmbed(nn.Module):
    """t [B] -> cos/sin features (freq_dim) -> Dense -> SiLU -> Dense: [B, hidden].

    Same math and parameter names as embeddings.TimestepMLP(cos_first=True, freq_shift=0),
    but with DiT's normal(0.02) kernel initialisation.
    """
    hidden: int
    freq_dim: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        emb = timestep_embedding(t, self.freq_dim, cos_first=True, freq_shift=0.0)
        init = nn.initializers.normal(0.02)
        emb = nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype, name="dense0")(emb)
        return nn.Dense(self.hidden, kernel_init=init, dtype=self.dtype,
                        name="dense1")(nn.silu(emb))


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: x [B, T, D], c [B, D] -> [B, T, D].

    With context_dim > 0 a cross-attention to context [B, L, context_dim] (after an
    affine LayerNorm, not modulated by c) sits between the self-attention and the MLP,
    as in PixArt-alpha; its output projection starts at zero, so a fresh block is still
    the identity.
    """
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None
    context_dim: int = 0

    @nn.compact
    def __call__(self, x: jnp.ndarray, c: jnp.ndarray,
                 context: jnp.ndarray | None = None) -> jnp.ndarray:
        d, heads = self.hidden_size, self.num_heads
        dense = functools.partial(nn.Dense, kernel_init=xavier, dtype=self.dtype)
        mod = nn.Dense(6 * d, kernel_init=zeros, dtype=self.dtype, name="adaLN")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)

        h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        # qkv channels are laid out [3, heads, head_dim], as in timm's Attention.
        b, t = h.shape[:2]
        qkv = dense(3 * d, name="qkv")(h).reshape(b, t, 3, heads, d // heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, heads, head_dim]
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = dense(d, name="proj")(h.reshape(b, t, d))
        x = x + gate_msa[:, None, :] * h

        if self.context_dim:
            h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm_xattn")(x)
            x = x + Attention(heads, d // heads, self.dtype, self.attention_impl,
                              zero_out=True, name="xattn")(h, context)

        h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        h = dense(int(d * self.mlp_ratio), name="fc1")(h)
        h = dense(d, name="fc2")(nn.gelu(h, approximate=True))
        return x + gate_mlp[:, None, :] * h


class ScanDiTBlock(DiTBlock):
    """DiTBlock in nn.scan's form: (x, c) -> (x_next, None); c is broadcast to every block."""

    def __call__(self, x: jnp.ndarray, c: jnp.ndarray,
                 context: jnp.ndarray | None = None) -> tuple[jnp.ndarray, None]:
        return super().__call__(x, c, context), None


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised linear map to patch pixels.

    x [B, T, D], c [B, D] -> [B, T, p * p * out_channels].
    """
    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
        mod = nn.Dense(2 * self.hidden_size, kernel_init=zeros, dtype=self.dtype,
                       name="adaLN")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, -1)
        x = modulate(_layer_norm(self.dtype, "norm")(x), shift, scale)
        p = self.patch_size
        return nn.Dense(p * p * self.out_channels, kernel_init=zeros, dtype=self.dtype,
                        name="linear")(x)
