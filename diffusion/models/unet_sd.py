"""Stable Diffusion's text-conditional U-Net, in the layout of diffusers'
`UNet2DConditionModel`: (x [B, H, W, C], t [B], context [B, L, D_ctx]) -> [B, H, W, out].

Time: sinusoids of t (block_out_channels[0] wide; [cos, sin] when flip_sin_to_cos, with
freq_shift in the frequency denominator), then Dense-SiLU-Dense to 4 * block_out_channels[0].
conv_in, down blocks (ResNet blocks, spatial transformers with cross-attention to the
text tokens in the CrossAttn variants, a stride-2 conv between levels), the mid block
(ResNet, transformer, ResNet), up blocks (one more ResNet per level than the down path,
each on the concatenation with an encoder activation, 2x nearest upsampling + conv),
then GroupNorm-SiLU-conv_out.

`UNetSDConfig` holds diffusers' config names. One naming trap is kept for fidelity:
diffusers reads `attention_head_dim` as the *number of heads* per block (SD 1.x: 8 for
every block, so head widths 40/80/160; SD 2.x: (5, 10, 20, 20), so every head is 64
wide). `UNetSDConfig.num_heads()` returns that per-block count.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from diffusion.models.embeddings import timestep_embedding
from diffusion.models.unet_sd_blocks import (DownBlock, MidBlock, TimestepEmbedding, UpBlock,
                                             conv3x3, group_norm)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value, n: int, name: str) -> tuple:
    """An int/bool for every block, or a per-block tuple checked for length n."""
    if isinstance(value, (int, bool)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} blocks: {value}")
    return value


@dataclasses.dataclass(frozen=True)
class UNetSDConfig:
    """Hyperparameters of `UNetSD`, named as in diffusers' UNet2DConditionModel config.

    attention_head_dim: heads per block (diffusers' reading of this name; see module
      docstring), an int for all blocks or one per down block (the up path reverses it).
    transformer_layers_per_block: BasicTransformerBlocks per spatial transformer.
    only_cross_attention: the first attention of each transformer block of the down
      and up blocks also attends to the text (no self-attention); the mid block's
      transformer keeps its self-attention (diffusers' UNetMidBlock2DCrossAttn).
    upcast_attention: accepted for fidelity; attention logits and softmax always run
      in float32 here.
    mid_block_scale_factor: the mid block's ResNets divide their output by it.
    """
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int | tuple[int, ...] = 1
    only_cross_attention: bool | tuple[bool, ...] = False
    upcast_attention: bool = False
    mid_block_scale_factor: float = 1.0

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels is empty")
        for name, types, known in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                   ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            bad = [b for b in types if b not in known]
            if bad:
                raise ValueError(f"unsupported {name} {bad}; known: {list(known)}")
            if len(types) != n:
                raise ValueError(f"{name} has {len(types)} entries for {n} "
                                 f"block_out_channels {tuple(self.block_out_channels)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"norm_num_groups {self.norm_num_groups} does not divide "
                                 f"{c} channels")
        for c, h in zip(self.block_out_channels, self.num_heads()):
            if h <= 0 or c % h:
                raise ValueError(f"{h} attention heads (attention_head_dim) do not divide "
                                 f"{c} channels")
        self.layers()
        self.transformer_layers()
        self.cross_only()

    def num_heads(self) -> tuple[int, ...]:
        return _per_block(self.attention_head_dim, len(self.block_out_channels),
                          "attention_head_dim")

    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, len(self.block_out_channels),
                          "layers_per_block")

    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                          "transformer_layers_per_block")

    def cross_only(self) -> tuple[bool, ...]:
        return _per_block(self.only_cross_attention, len(self.block_out_channels),
                          "only_cross_attention")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def sd1_config(**overrides) -> UNetSDConfig:
    """Stable Diffusion 1.x (CLIP ViT-L/14 text tokens, 768 wide; 64x64x4 latents)."""
    return UNetSDConfig(**overrides)


def sd2_config(**overrides) -> UNetSDConfig:
    """Stable Diffusion 2.x (OpenCLIP ViT-H/14 tokens, 1024 wide; 64-wide heads, linear
    proj_in/proj_out). sample_size 96 is the 768x768 v-prediction model; the 512 base
    model has 64."""
    base = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                use_linear_projection=True, sample_size=96)
    return UNetSDConfig(**{**base, **overrides})


class UNetSD(nn.Module):
    """diffusers' UNet2DConditionModel (SD 1.x / 2.x), NHWC.

    attention_impl: passed to jax.nn.dot_product_attention (None = JAX's choice,
      'xla', or 'cudnn': NVIDIA GPUs, half-precision activations, head_dim a multiple
      of 8 up to 128, or 256 on Hopper).
    dtype: activation dtype; parameters stay float32 and the output is float32.
    """
    config: UNetSDConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str | None = None

    def _check_inputs(self, x, t, context) -> jnp.ndarray:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNetSD expects x of shape [B, H, W, {cfg.in_channels}], "
                             f"got {x.shape}")
        b, hgt, wid, _ = x.shape
        f = cfg.downsample_factor
        if hgt % f or wid % f:
            raise ValueError(f"image size {hgt}x{wid} is not divisible by {f} = 2**(number "
                             f"of levels - 1)")
        if context.ndim != 3 or context.shape[0] != b or \
                context.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNetSD expects context of shape [B={b}, L, "
                             f"cross_attention_dim={cfg.cross_attention_dim}], got "
                             f"{context.shape}")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"UNetSD expects t of shape [B] = ({b},), got {t.shape}")
        return t

    @nn.compact
    def __call__(self, x: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        """x [B, H, W, in_channels], t [B] (or a scalar), context [B, L, D_ctx] (text
        tokens) -> [B, H, W, out_channels] in float32."""
        cfg = self.config
        t = self._check_inputs(x, t, context)
        chans, heads = tuple(cfg.block_out_channels), cfg.num_heads()
        layers, tlayers, cross_only = cfg.layers(), cfg.transformer_layers(), cfg.cross_only()
        n = len(chans)
        context = context.astype(self.dtype)
        common = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                      use_linear_projection=cfg.use_linear_projection, dtype=self.dtype,
                      attention_impl=self.attention_impl)

        emb = timestep_embedding(t, chans[0], cos_first=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift).astype(self.dtype)
        emb = TimestepEmbedding(4 * chans[0], self.dtype, name="time_embedding")(emb)
        emb = nn.silu(emb)  # every ResNet block's time_emb_proj reads SiLU(emb)

        h = conv3x3(chans[0], self.dtype, "conv_in")(x.astype(self.dtype))
        skips = [h]
        for i, kind in enumerate(cfg.down_block_types):
            cross = kind == "CrossAttnDownBlock2D"
            h, s = DownBlock(chans[i], layers[i], heads=heads[i] if cross else 0,
                             transformer_layers=tlayers[i], only_cross_attention=cross_only[i],
                             add_downsample=i < n - 1, name=f"down_blocks_{i}",
                             **common)(h, emb, context)
            skips += s

        h = MidBlock(chans[-1], 1, heads=heads[-1], transformer_layers=tlayers[-1],
                     output_scale_factor=cfg.mid_block_scale_factor, name="mid_block",
                     **common)(h, emb, context)

        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i
            cross = kind == "CrossAttnUpBlock2D"
            m = layers[level] + 1
            h = UpBlock(chans[level], m, heads=heads[level] if cross else 0,
                        transformer_layers=tlayers[level],
                        only_cross_attention=cross_only[level], add_upsample=i < n - 1,
                        name=f"up_blocks_{i}", **common)(h, skips[-m:], emb, context)
            del skips[-m:]
        assert not skips, "every encoder activation is consumed by the up path"

        h = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype,
                               "conv_norm_out")(h))
        return conv3x3(cfg.out_channels, self.dtype, "conv_out")(h).astype(jnp.float32)
