"""Blocks of Stable Diffusion's conditional U-Net in diffusers' `UNet2DConditionModel`
layout: ResNet blocks with a time-embedding projection, spatial transformers
(self-attention, cross-attention to text tokens, GEGLU feed-forward), resampling, and
the down / mid / up blocks built from them.

Submodule names are diffusers' state-dict names with list indices folded in
(`attentions.0.transformer_blocks.0.attn2.to_out.0` ->
`attentions_0/transformer_blocks_0/attn2/to_out_0`), so the converter in
`diffusion.convert.diffusers_unet` is a mechanical renaming. Feature maps are NHWC
h: [B, H, W, C]; text tokens are context: [B, L, D_ctx]; the time embedding emb [B, E]
arrives already SiLU-activated (every ResNet block of SD applies SiLU before its
projection, so the U-Net does it once).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion.models.attention import Attention

Dtype = Any

# diffusers builds the GroupNorm in front of each spatial transformer with eps=1e-6,
# whatever the U-Net's norm_eps (which the ResNet blocks and conv_norm_out use).
TRANSFORMER_NORM_EPS = 1e-6
# nn.LayerNorm's default in diffusers' BasicTransformerBlock.
LAYER_NORM_EPS = 1e-5


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance: the one-pass E[x^2]-E[x]^2 drifts from PyTorch on activations
    # with large means.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype,
                        use_fast_variance=False, name=name)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, use_fast_variance=False,
                        name=name)


def conv3x3(features: int, dtype: Dtype, name: str, strides: int = 1) -> nn.Conv:
    # Symmetric padding 1, as torch's Conv2d(padding=1); with stride 2 on an even size
    # this reads the same pixels as diffusers' Downsample2D (downsample_padding=1).
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                   dtype=dtype, name=name)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features [B, freq_dim] -> Dense(hidden) -> SiLU -> Dense(hidden)."""
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        emb = nn.Dense(self.hidden, dtype=self.dtype, name="linear_1")(features)
        return nn.Dense(self.hidden, dtype=self.dtype, name="linear_2")(nn.silu(emb))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, + Dense(emb), GroupNorm-SiLU-conv, + (1x1-projected) input,
    all divided by output_scale_factor."""
    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray) -> jnp.ndarray:
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv3x3(self.out_channels, self.dtype, "conv1")(h)
        h = h + nn.Dense(self.out_channels, dtype=self.dtype,
                         name="time_emb_proj")(emb)[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """3x3 conv with stride 2 (padding 1 on every side)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return conv3x3(x.shape[-1], self.dtype, "conv", strides=2)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(x.shape[-1], self.dtype, "conv")(x)


class GEGLU(nn.Module):
    """Dense to 2 * hidden, split into (value, gate), value * GELU(gate) (exact erf GELU)."""
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        value, gate = jnp.split(nn.Dense(2 * self.hidden, dtype=self.dtype, name="proj")(x),
                                2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU to mult * C, then Dense back to C (diffusers' `ff.net.0` / `ff.net.2`)."""
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = GEGLU(self.mult * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """x [B, T, C] + attn1(LN x) + attn2(LN x, context) + ff(LN x).

    only_cross_attention: attn1 also attends to the context instead of to x.
    """
    heads: int
    head_dim: int
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        attn = lambda name: Attention(self.heads, self.head_dim, self.dtype,  # noqa: E731
                                      self.attention_impl, name=name)
        h = layer_norm(self.dtype, "norm1")(x)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        x = x + attn("attn2")(layer_norm(self.dtype, "norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm(self.dtype, "norm3")(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, proj_in (1x1 conv, or Dense when
    use_linear_projection: SD 2), `num_layers` BasicTransformerBlocks over the H*W
    tokens, proj_out, plus the input. [B, H, W, C] -> [B, H, W, C]."""
    heads: int
    head_dim: int
    groups: int
    num_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        b, hgt, wid, c = x.shape
        inner = self.heads * self.head_dim
        # A 1x1 conv on NHWC is a Dense over channels; both forms are kept so the
        # parameter shapes (HWIO kernel vs [in, out]) match the checkpoint's layout.
        if self.use_linear_projection:
            proj = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)  # noqa: E731
        else:
            proj = lambda n, name: nn.Conv(n, (1, 1), dtype=self.dtype, name=name)  # noqa: E731
        h = group_norm(self.groups, TRANSFORMER_NORM_EPS, self.dtype, "norm")(x)
        h = proj(inner, "proj_in")(h).reshape(b, hgt * wid, inner)
        for k in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.only_cross_attention,
                                      self.dtype, self.attention_impl,
                                      name=f"transformer_blocks_{k}")(h, context)
        h = proj(c, "proj_out")(h.reshape(b, hgt, wid, inner))
        return x + h


class SpatialBlockSpec(nn.Module):
    """Hyperparameters every down / mid / up block shares (a base class, not a layer)."""
    out_channels: int
    num_layers: int
    groups: int
    eps: float
    # The cross-attention variants' transformer; heads = 0 means no transformer.
    heads: int = 0
    transformer_layers: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    def resnet(self, j: int, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(self.out_channels, self.groups, self.eps, scale, self.dtype,
                             name=f"resnets_{j}")

    def transformer(self, j: int) -> Transformer2DModel:
        if self.out_channels % self.heads:
            raise ValueError(f"{self.heads} attention heads do not divide "
                             f"{self.out_channels} channels")
        return Transformer2DModel(self.heads, self.out_channels // self.heads, self.groups,
                                  self.transformer_layers, self.use_linear_projection,
                                  self.only_cross_attention, self.dtype, self.attention_impl,
                                  name=f"attentions_{j}")


class DownBlock(SpatialBlockSpec):
    """diffusers' DownBlock2D (heads = 0) or CrossAttnDownBlock2D: `num_layers` ResNet
    blocks, each followed by a spatial transformer in the cross-attention variant, then an
    optional stride-2 conv. Returns (h, the activations the up path concatenates)."""
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray,
                 context: jnp.ndarray | None) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        skips = []
        for j in range(self.num_layers):
            x = self.resnet(j)(x, emb)
            if self.heads:
                x = self.transformer(j)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(SpatialBlockSpec):
    """diffusers' UpBlock2D (heads = 0) or CrossAttnUpBlock2D: per layer, concatenate
    a skip activation on channels (the last of `skips` first), a ResNet block (and a
    spatial transformer); then an optional 2x upsample. `skips` holds exactly
    `num_layers` encoder activations, in the order the encoder made them."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, skips: Sequence[jnp.ndarray], emb: jnp.ndarray,
                 context: jnp.ndarray | None) -> jnp.ndarray:
        if len(skips) != self.num_layers:
            raise ValueError(f"up block with {self.num_layers} layers got {len(skips)} "
                             f"skip activations")
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = self.resnet(j)(x, emb)
            if self.heads:
                x = self.transformer(j)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.dtype, name="upsamplers_0")(x)
        return x


class MidBlock(SpatialBlockSpec):
    """diffusers' UNetMidBlock2DCrossAttn: ResNet, then `num_layers` x (spatial
    transformer, ResNet); the ResNets divide by output_scale_factor."""
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, emb: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        x = self.resnet(0, self.output_scale_factor)(x, emb)
        for j in range(self.num_layers):
            x = self.transformer(j)(x, context)
            x = self.resnet(j + 1, self.output_scale_factor)(x, emb)
        return x
