"""Multi-head attention of token queries to a context (cross-attention), or to
themselves: the attention of the text-conditional networks.

Stable Diffusion's U-Net (`unet_sd_blocks`) uses it for its self- and cross-attention;
the project's own U-Net and DiT use it to attend to text tokens when built with a
`context_dim`. Parameter names follow diffusers (`to_q`, `to_k`, `to_v`, `to_out_0`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class Attention(nn.Module):
    """x [B, T, C] attends to context [B, L, D] (to x itself when context is None):
    q, k, v without bias, output projection to C with bias.

    The logits and softmax run in float32 whatever the activation dtype
    (jax.nn.dot_product_attention promotes them), which is what diffusers'
    `upcast_attention` asks for. `implementation` is passed through ('cudnn' = fused
    attention on NVIDIA GPUs). zero_out zero-initialises the output projection, so a
    residual branch built on it starts as the identity.
    """
    heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    implementation: str | None = None
    zero_out: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray | None = None) -> jnp.ndarray:
        ctx = x if context is None else context
        inner = self.heads * self.head_dim
        b, t, c = x.shape

        def heads(name: str, h: jnp.ndarray) -> jnp.ndarray:
            h = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(h)
            return h.reshape(b, h.shape[1], self.heads, self.head_dim)

        q, k, v = heads("to_q", x), heads("to_k", ctx), heads("to_v", ctx)
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        # lecun_normal is nn.Dense's own default.
        out_init = nn.initializers.zeros_init() if self.zero_out else \
            nn.initializers.lecun_normal()
        return nn.Dense(c, kernel_init=out_init, dtype=self.dtype,
                        name="to_out_0")(h.reshape(b, t, inner))


def check_context(context: jnp.ndarray | None, context_dim: int, batch: int,
                  model: str) -> None:
    """Raises ValueError unless context is [batch, L, context_dim] tokens for a model
    with context_dim > 0, or None for one without cross-attention (context_dim = 0)."""
    if context_dim < 0:
        raise ValueError(f"{model}: context_dim must be >= 0, got {context_dim}")
    if context_dim == 0:
        if context is not None:
            raise ValueError(f"context was given to a {model} without cross-attention "
                             f"(context_dim=0); pass context=None or set context_dim")
        return
    if context is None:
        raise ValueError(f"{model} with context_dim={context_dim} needs context tokens "
                         f"of shape [B, L, {context_dim}]")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != context_dim:
        raise ValueError(f"{model} expects context of shape [B={batch}, L, "
                         f"context_dim={context_dim}], got {tuple(context.shape)}")
