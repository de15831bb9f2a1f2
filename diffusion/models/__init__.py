"""Denoising networks (U-Net, DiT) and the autoencoder, and `build_model` from a config.

Networks take explicit hyperparameters; `build_model` is the one place that reads the
`model` section of a config. MODELS is the explicit registry of networks (denoisers,
and "vae", the KL autoencoder that train.objective "vae" trains): model.name -> a builder
that reads that network's own section (model.unet, model.dit, model.vae). `init_params`
builds the parameters of any of them, calling each with its own signature. With
model.text.enabled the denoiser is built with cross-attention (context_dim = the text
width) and wrapped with its text encoder (text_conditional.TextConditional), which takes
the captions' token ids where a class-conditional network takes labels.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion.config_file import ConfigError
from diffusion.models.dit import DiT, dit_variant, scan_blocks_for
from diffusion.models.text_conditional import (TextConditional, context_width, is_text_section,
                                               with_text)
from diffusion.models.unet import UNet
from diffusion.models.vae import AutoencoderKL

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# model.attention_impl -> jax.nn.dot_product_attention(implementation=...) for the
# denoisers' attention: "" = JAX's choice (XLA today), "xla", or "cudnn" (the fused
# kernel: NVIDIA GPUs, bfloat16 activations, head_dim a multiple of 8 up to 128).
ATTENTION_IMPLS = {"": None, "xla": "xla", "cudnn": "cudnn"}


def attention_implementation(name: str | None, dtype: str,
                             backend: str | None = None) -> str | None:
    """Checks model.attention_impl against the dtype and the backend (default: JAX's)
    and returns the `implementation` argument, so that a bad value fails here with
    the key named, not inside XLA after tracing."""
    name = name or ""
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"unknown model.attention_impl {name!r}; known: "
                         f"{sorted(ATTENTION_IMPLS)} ('' = JAX's default)")
    if name == "cudnn":
        backend = backend or jax.default_backend()
        if backend != "gpu":
            raise ValueError(f"model.attention_impl='cudnn' needs an NVIDIA GPU (cuDNN "
                             f"fused attention), but JAX's backend is {backend!r}; use "
                             f"'xla' or ''")
        if dtype not in ("bfloat16", "float16"):
            raise ValueError(f"model.attention_impl='cudnn' needs half-precision "
                             f"activations (model.dtype='bfloat16'), got {dtype!r}")
    return ATTENTION_IMPLS[name]


def _out_channels(image_shape: tuple, learned_sigma: bool) -> int:
    return 2 * image_shape[2] if learned_sigma else image_shape[2]


def _attention(model: ml_collections.ConfigDict) -> str | None:
    # Old runs' config.json lack the key.
    return attention_implementation(model.get("attention_impl", ""), model.dtype)


def _context_dim(model: ml_collections.ConfigDict) -> int:
    """Width of the text tokens the denoiser cross-attends to; 0 = no text."""
    return context_width(model.text) if is_text_section(model) else 0


def _check_unet_levels(unet: ml_collections.ConfigDict, size: int) -> None:
    """Every U-Net attention resolution must be a level the network reaches for
    size x size images (otherwise those layers silently vanish)."""
    n_levels = len(unet.ch_mult)
    if n_levels < 1:
        raise ConfigError("model.unet.ch_mult must have at least one level")
    if size % 2 ** (n_levels - 1):
        raise ConfigError(
            f"data.image_size {size} cannot be halved {n_levels - 1} times by the U-Net's "
            f"{n_levels} levels (model.unet.ch_mult={tuple(unet.ch_mult)}); use a "
            f"multiple of {2 ** (n_levels - 1)}")
    levels = [size // 2 ** i for i in range(n_levels)]
    missing = [r for r in unet.attn_resolutions if r not in levels]
    if missing:
        raise ConfigError(
            f"model.unet.attn_resolutions={tuple(unet.attn_resolutions)}: {missing} is no "
            f"level of the U-Net for {size}x{size} images (levels: {levels}); those "
            f"attention layers would silently not exist")


def build_unet(model: ml_collections.ConfigDict, image_shape: tuple, num_classes: int,
               learned_sigma: bool) -> UNet:
    """The U-Net of model.unet (plus model.remat, dtype, attention_impl)."""
    _check_unet_levels(model.unet, int(image_shape[0]))
    return UNet(**model.unet.to_dict(), out_channels=_out_channels(image_shape, learned_sigma),
                num_classes=num_classes, remat=model.remat, dtype=DTYPES[model.dtype],
                attn_implementation=_attention(model), context_dim=_context_dim(model))


def build_dit(model: ml_collections.ConfigDict, image_shape: tuple, num_classes: int,
              learned_sigma: bool) -> DiT:
    """The DiT of model.dit: a paper variant ("B/2"), any of hidden_size, depth,
    num_heads overriding it when non-zero (plus model.remat, dtype, attention_impl)."""
    h, w, c = image_shape
    if h != w:
        raise ValueError(f"DiT needs square images, got {h}x{w}")
    arch = dit_variant(model.dit.variant)
    for k in ("hidden_size", "depth", "num_heads"):  # 0 = the variant's value
        if model.dit.get(k, 0):
            arch[k] = model.dit[k]
    # A run's config.json from before scan_blocks existed: its checkpoints are unrolled.
    scan = scan_blocks_for(model.dit.get("scan_blocks", "off"), arch["depth"])
    return DiT(input_size=h, in_channels=c, num_classes=num_classes, learn_sigma=learned_sigma,
               remat=model.remat, scan_blocks=scan, dtype=DTYPES[model.dtype],
               attention_impl=_attention(model), context_dim=_context_dim(model), **arch)


def build_vae(model: ml_collections.ConfigDict, image_shape: tuple, num_classes: int,
              learned_sigma: bool) -> AutoencoderKL:
    """The KL autoencoder of model.vae (train.objective "vae"), channels from the data;
    its attention is its own (diffusers')."""
    if learned_sigma or num_classes > 0 or is_text_section(model):
        raise ValueError("model 'vae' (the KL autoencoder) is unconditional and has no "
                         "variance output: set conditioning.num_classes=0, "
                         "model.text.enabled=False and diffusion.learned_sigma=False")
    v, c = model.vae, image_shape[2]
    return AutoencoderKL(
        in_channels=c, out_channels=c, latent_channels=v.latent_channels,
        block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
        norm_num_groups=v.norm_num_groups, mid_attention=v.mid_attention,
        dtype=DTYPES[model.dtype])


# model.name -> builder(model section, image_shape (H, W, C), num_classes, learned_sigma):
# each reads its own hyperparameter section (model.<name>). A new network is a module,
# a builder and one line here, plus its config and test.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": build_unet,
    "dit": build_dit,
    "vae": build_vae,
}


def build_model(model: ml_collections.ConfigDict, image_shape: tuple, num_classes: int,
                learned_sigma: bool = False) -> nn.Module:
    """The network model.name names (see MODELS) for images of `image_shape` (H, W, C)."""
    if model.name not in MODELS:
        raise ValueError(f"unknown model.name {model.name!r}; known: {sorted(MODELS)}")
    if model.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {model.dtype!r}; known: {sorted(DTYPES)}")
    _attention(model)  # a bad value fails for every model, with the key named
    net = MODELS[model.name](model, tuple(image_shape), num_classes, learned_sigma)
    if not is_text_section(model):
        return net
    if num_classes > 0:
        raise ValueError("a text-conditional model (model.text.enabled) conditions on "
                         "captions alone: set conditioning.num_classes=0")
    return with_text(net, model.text, DTYPES[model.dtype])


def init_params(model, key: jax.Array, image_shape: tuple, num_classes: int):
    """Parameters of a network of MODELS for images of `image_shape` (H, W, C), from a
    batch of one; call under jit or jax.eval_shape. A denoiser is called as
    model(x, t, y, train=False) (y only for num_classes > 0; token ids [1, L] for a
    text-conditional model), the autoencoder as model(x)."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    if isinstance(model, AutoencoderKL):
        return model.init({"params": key}, x)["params"]
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if num_classes > 0 else None
    if isinstance(model, TextConditional):
        y = jnp.zeros((1, model.max_length), jnp.int32)
    return model.init({"params": key}, x, t, y, train=False)["params"]
