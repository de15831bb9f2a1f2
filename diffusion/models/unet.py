"""The DDPM/ADM U-Net denoiser: (x [B, H, W, C], t [B], y [B] | None) -> [B, H, W, out].

Layout of DDPM's CIFAR-10 model (Ho et al. 2020), with ADM's options (Dhariwal & Nichol
2021) as switches: FiLM-style scale/shift in the residual blocks, up/downsampling inside
residual blocks, multi-head attention and class conditioning. With the defaults and
dropout=0.1 at 32x32x3 it is DDPM's 35.7M-parameter network.

Encoder: conv_in, then per level `num_res_blocks` ResBlocks (each followed by attention
when the feature-map height is in `attn_resolutions`), a 2x downsample between levels.
Middle: ResBlock, attention, ResBlock. Decoder: per level `num_res_blocks + 1` ResBlocks
on the concatenation with the matching encoder activation, a 2x upsample between
levels. Out: GroupNorm, SiLU, zero-initialised conv_out.

Text conditioning (context_dim > 0): every self-attention block is followed by a
cross-attention block from the feature map to context tokens [B, L, context_dim]
(e.g. a text encoder's output), named `<attention>_xattn`. Its output projection
starts at zero; with context_dim = 0 (the default) the network is unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffusion.models.attention import check_context
from diffusion.models.embeddings import LabelEmbedding, TimestepMLP
from diffusion.models.unet_blocks import (AttnBlock, CrossAttnBlock, Downsample, ResBlock,
                                          Upsample, conv3x3, group_norm)


class UNet(nn.Module):
    """DDPM/ADM U-Net.

    Attributes:
      ch: base width; level i has ch * ch_mult[i] channels. Also the sinusoid size of
        the time embedding, whose MLP width is 4 * ch.
      ch_mult: width multipliers, one per resolution level.
      num_res_blocks: ResBlocks per encoder level (the decoder has one more).
      attn_resolutions: feature-map heights (in pixels) that get self-attention.
      num_heads: attention heads, unless head_dim is set.
      head_dim: if set, channels per head (ADM's num_head_channels); heads = C // head_dim.
      dropout: dropout rate inside ResBlocks, active only with train=True.
      out_channels: output channels; None = input channels (use 2 * C for a learned
        variance).
      num_classes: 0 = unconditional; K > 0 adds a label embedding with K + 1 rows (row
        K, or any negative label, is the null class).
      scale_shift_norm: ADM's FiLM conditioning in ResBlocks.
      resblock_updown: resample with ResBlocks (ADM) instead of strided conv /
        nearest-upsample + conv (DDPM).
      remat: rematerialise each block in the backward pass (less memory, more compute).
      attn_implementation: passed to jax.nn.dot_product_attention; None = XLA,
        'cudnn' = fused attention on NVIDIA GPUs (bf16/fp16, head_dim % 8 == 0, <= 128).
      context_dim: width D of the context tokens [B, L, D] that cross-attention blocks
        (after each self-attention) read; 0 = no cross-attention (and no context input).
      dtype: activation dtype; parameters stay float32 and the output is float32.
    """
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    head_dim: int | None = None
    dropout: float = 0.0
    out_channels: int | None = None
    num_classes: int = 0
    scale_shift_norm: bool = False
    resblock_updown: bool = False
    remat: bool = False
    attn_implementation: str | None = None
    context_dim: int = 0
    dtype: jnp.dtype = jnp.float32

    def _check_inputs(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None,
                      context: jnp.ndarray | None = None) -> jnp.ndarray:
        """Raises ValueError on bad shapes (at trace time, before compiling); returns t [B]."""
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C], got shape {x.shape}")
        if not self.ch_mult:
            raise ValueError("UNet needs at least one level in ch_mult")
        B, H, W, _ = x.shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if H % factor or W % factor:
            raise ValueError(
                f"image size {H}x{W} is not divisible by {factor} = 2**(len(ch_mult)-1) "
                f"for ch_mult={tuple(self.ch_mult)}; use sizes that are multiples of "
                f"{factor} or fewer levels")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (B,))
        if t.shape != (B,):
            raise ValueError(f"UNet expects t of shape [B] = ({B},), got {t.shape}")
        if y is not None:
            if self.num_classes == 0:
                raise ValueError("labels y were given to an unconditional UNet "
                                 "(num_classes=0); pass y=None or set num_classes")
            if jnp.shape(y) != (B,):
                raise ValueError(f"UNet expects y of shape [B] = ({B},), got {jnp.shape(y)}")
        check_context(context, self.context_dim, B, "UNet")
        return t

    def _heads(self, channels: int) -> int:
        if self.head_dim is None:
            return self.num_heads
        if channels % self.head_dim:
            raise ValueError(f"head_dim {self.head_dim} does not divide {channels} channels")
        return channels // self.head_dim

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None,
                 train: bool = False, context: jnp.ndarray | None = None) -> jnp.ndarray:
        """context: [B, L, context_dim] tokens, required iff context_dim > 0."""
        t = self._check_inputs(x, t, y, context)
        B = x.shape[0]
        out_ch = self.out_channels if self.out_channels is not None else x.shape[-1]

        # train is a Python bool: static under remat (index 3 counts `self`).
        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
        xattn_cls = nn.remat(CrossAttnBlock) if self.remat else CrossAttnBlock

        def res(h, out, name, up=False, down=False):
            block = res_cls(out, dropout=self.dropout, scale_shift_norm=self.scale_shift_norm,
                            up=up, down=down, dtype=self.dtype, name=name)
            return block(h, emb, train)

        def attn(h, name):
            heads = self._heads(h.shape[-1])
            h = attn_cls(heads, dtype=self.dtype, implementation=self.attn_implementation,
                         name=name)(h)
            if self.context_dim:
                h = xattn_cls(heads, dtype=self.dtype,
                              implementation=self.attn_implementation,
                              name=f"{name}_xattn")(h, context)
            return h

        # Conditioning: DDPM's sinusoid (freq_shift=1) -> MLP, plus ADM's label embedding.
        emb = TimestepMLP(freq_dim=self.ch, hidden=4 * self.ch, freq_shift=1.0,
                          dtype=self.dtype, name="temb")(t)
        if self.num_classes > 0:
            if y is None:
                y = jnp.full((B,), self.num_classes, dtype=jnp.int32)
            emb = emb + LabelEmbedding(self.num_classes, 4 * self.ch, dtype=self.dtype,
                                       name="label_emb")(y)
        # Every ResBlock applies SiLU before its projection; do it once here.
        emb = nn.silu(emb)

        h = conv3x3(self.ch, self.dtype, "conv_in")(x.astype(self.dtype))
        skips = [h]
        n_levels = len(self.ch_mult)
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = res(h, self.ch * mult, f"down_{i}_res_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h, f"down_{i}_attn_{j}")
                skips.append(h)
            if i != n_levels - 1:
                if self.resblock_updown:
                    h = res(h, h.shape[-1], f"down_{i}_resample", down=True)
                else:
                    h = Downsample(self.dtype, name=f"down_{i}_resample")(h)
                skips.append(h)

        h = res(h, h.shape[-1], "mid_res_0")
        h = attn(h, "mid_attn")
        h = res(h, h.shape[-1], "mid_res_1")

        for i in reversed(range(n_levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(h, self.ch * self.ch_mult[i], f"up_{i}_res_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h, f"up_{i}_attn_{j}")
            if i != 0:
                if self.resblock_updown:
                    h = res(h, h.shape[-1], f"up_{i}_resample", up=True)
                else:
                    h = Upsample(self.dtype, name=f"up_{i}_resample")(h)
        assert not skips, "every encoder activation is consumed by the decoder"

        h = nn.silu(group_norm(h.shape[-1], self.dtype, "norm_out")(h))
        h = conv3x3(out_ch, self.dtype, "conv_out", zero=True)(h)
        return h.astype(jnp.float32)
