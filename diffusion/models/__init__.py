"""Denoising networks (U-Net, DiT) and the autoencoder, and `build_model` from a config.

Networks take explicit hyperparameters; `build_model` is the one place that reads the
`model` section of a config. MODELS is the explicit registry of networks (denoisers,
and "vae", the KL autoencoder that train.objective "vae" trains). `init_params` builds
the parameters of any of them, calling each with its own signature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from diffusion.models.dit import DiT, dit_variant, scan_blocks_for
from diffusion.models.unet import UNet
from diffusion.models.vae import AutoencoderKL

MODELS = {"unet": UNet, "dit": DiT, "vae": AutoencoderKL}
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


def build_model(model: ml_collections.ConfigDict, image_shape: tuple, num_classes: int,
                learned_sigma: bool = False):
    """The network for images of `image_shape` (H, W, C): a denoiser, or for
    model.name "vae" the KL autoencoder (train.objective "vae")."""
    if model.name not in MODELS:
        raise ValueError(f"unknown model.name {model.name!r}; known: {sorted(MODELS)}")
    if model.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {model.dtype!r}; known: {sorted(DTYPES)}")
    h, w, c = image_shape
    out_channels = 2 * c if learned_sigma else c
    dtype = DTYPES[model.dtype]
    # Old runs' config.json lack the key. The VAE's attention is its own (diffusers').
    attention = attention_implementation(model.get("attention_impl", ""), model.dtype)
    if model.name == "vae":
        if learned_sigma or num_classes > 0:
            raise ValueError("model 'vae' (the KL autoencoder) is unconditional and has no "
                             "variance output: set conditioning.num_classes=0 and "
                             "diffusion.learned_sigma=False")
        v = model.vae
        return AutoencoderKL(
            in_channels=c, out_channels=c, latent_channels=v.latent_channels,
            block_out_channels=tuple(v.block_out_channels),
            layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
            mid_attention=v.mid_attention, dtype=dtype)
    if model.name == "unet":
        return UNet(**model.unet.to_dict(), out_channels=out_channels, num_classes=num_classes,
                    remat=model.remat, dtype=dtype, attn_implementation=attention)
    if h != w:
        raise ValueError(f"DiT needs square images, got {h}x{w}")
    arch = dit_variant(model.dit.variant)
    for k in ("hidden_size", "depth", "num_heads"):  # 0 = the variant's value
        if model.dit.get(k, 0):
            arch[k] = model.dit[k]
    # A run's config.json from before scan_blocks existed: its checkpoints are unrolled.
    scan = scan_blocks_for(model.dit.get("scan_blocks", "off"), arch["depth"])
    return DiT(input_size=h, in_channels=c, num_classes=num_classes, learn_sigma=learned_sigma,
               remat=model.remat, scan_blocks=scan, dtype=dtype, attention_impl=attention,
               **arch)


def init_params(model, key: jax.Array, image_shape: tuple, num_classes: int):
    """Parameters of a network of MODELS for images of `image_shape` (H, W, C), from a
    batch of one; call under jit or jax.eval_shape. A denoiser is called as
    model(x, t, y, train=False) (y only for num_classes > 0), the autoencoder as model(x)."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    if isinstance(model, AutoencoderKL):
        return model.init({"params": key}, x)["params"]
    t = jnp.zeros((1,), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if num_classes > 0 else None
    return model.init({"params": key}, x, t, y, train=False)["params"]
