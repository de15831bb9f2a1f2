"""Convert diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x) to our `UNetSD`.

    config, params = load_diffusers_unet("stable-diffusion-2-1/unet")
    eps = UNetSD(config).apply({"params": params}, x, t, context)   # x NHWC

Our module names are diffusers' keys with list indices folded in, so the weights map
mechanically (`diffusion.convert.params.fill_params`: conv OIHW -> HWIO, linear
[out, in] -> [in, out], norm weight -> scale). The config maps name for name; options
of UNet2DConditionModel that `UNetSD` does not implement (class / addition embeddings,
other block types, scale-shift ResNets, ...) are refused by name unless they hold their
neutral value.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.convert.params import fill_params
from diffusion.convert.torch_files import load_state_dict
from diffusion.models.unet_sd import UNetSD, UNetSDConfig

# Looked for in this order; an index file lists the shards of a large model.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.bin.index.json")

# diffusers config keys that UNetSDConfig carries under the same name.
_SAME_NAME = tuple(f.name for f in UNetSDConfig.__dataclass_fields__.values())
_TUPLE_KEYS = ("down_block_types", "up_block_types", "block_out_channels",
               "layers_per_block", "attention_head_dim", "transformer_layers_per_block",
               "only_cross_attention")
# Options UNetSD does not implement, with the value(s) that mean "off". Ignored:
# `dropout`, a training-time option of the torch model that does not change inference,
# and two options that only other block types read (the mid block
# UNetMidBlock2DCrossAttn has no only-cross-attention switch).
_NEUTRAL = {
    "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "downsample_padding": (1,), "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "dual_cross_attention": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
}
_IGNORED = ("dropout", "addition_embed_type_num_heads", "mid_block_only_cross_attention")


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetSDConfig:
    """A diffusers UNet2DConditionModel config (its config.json) -> UNetSDConfig.

    Keys starting with '_' (class name, diffusers version) are skipped; any other key
    must be one UNetSD implements, or hold its neutral value, else a ValueError names it.
    """
    kwargs: dict[str, Any] = {}
    unsupported, unknown = [], []
    for key, value in config.items():
        if key.startswith("_") or key in _IGNORED:
            continue
        if key in _NEUTRAL:
            if value not in _NEUTRAL[key]:
                unsupported.append(f"{key}={value!r}")
        elif key in _SAME_NAME:
            if key in _TUPLE_KEYS and isinstance(value, (list, tuple)):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            kwargs[key] = value
        else:
            unknown.append(key)
    if unsupported:
        raise ValueError(f"unsupported UNet2DConditionModel options: {', '.join(unsupported)} "
                         f"(UNetSD implements Stable Diffusion 1.x / 2.x's U-Net)")
    if unknown:
        raise ValueError(f"unknown UNet2DConditionModel config keys {sorted(unknown)}")
    if not isinstance(kwargs.get("cross_attention_dim", 0), int):
        raise ValueError(f"cross_attention_dim must be one int, got "
                         f"{kwargs['cross_attention_dim']!r}")
    if kwargs.get("norm_num_groups", 32) is None:
        raise ValueError("norm_num_groups=None (no output GroupNorm) is not supported")
    if kwargs.get("sample_size") is None:
        kwargs.pop("sample_size", None)
    return UNetSDConfig(**kwargs)


def convert_diffusers_unet(state_dict: Mapping[str, np.ndarray],
                           config: UNetSDConfig | Mapping[str, Any]) -> dict:
    """diffusers UNet2DConditionModel state dict -> our `params` tree (numpy float32).

    config: a UNetSDConfig or a diffusers config dict. Every parameter must be filled
    and every key used; otherwise a ValueError lists missing and unexpected keys, and a
    tensor of the wrong shape is named with both shapes.
    """
    if not isinstance(config, UNetSDConfig):
        config = unet_config_from_diffusers(config)
    f = config.downsample_factor
    template = jax.eval_shape(
        UNetSD(config).init, jax.random.key(0), jnp.zeros((1, f, f, config.in_channels)),
        jnp.zeros((1,)), jnp.zeros((1, 1, config.cross_attention_dim)))["params"]
    return fill_params(state_dict, template, "UNet2DConditionModel")


def find_unet_files(path: str | os.PathLike) -> tuple[str, list[str]]:
    """A diffusers `unet/` folder, or a pipeline folder holding one -> (folder, weight
    files: one, or the shards an index file lists)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a diffusers model folder: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isdir(os.path.join(path, "unet")):
        path = os.path.join(path, "unet")
    name = next((w for w in WEIGHT_FILES if os.path.isfile(os.path.join(path, w))), None)
    if name is None or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} needs config.json and one of {', '.join(WEIGHT_FILES)}")
    if not name.endswith(".index.json"):
        return path, [os.path.join(path, name)]
    with open(os.path.join(path, name)) as fh:
        shards = sorted(set(json.load(fh)["weight_map"].values()))
    return path, [os.path.join(path, s) for s in shards]


def load_diffusers_unet(path: str | os.PathLike) -> tuple[UNetSDConfig, dict]:
    """Read a diffusers UNet2DConditionModel folder (config.json +
    diffusion_pytorch_model.safetensors, or a pipeline folder with `unet/`) ->
    (UNetSDConfig, params). Use as `UNetSD(config).apply({'params': params}, x, t, ctx)`."""
    folder, files = find_unet_files(path)
    with open(os.path.join(folder, "config.json")) as fh:
        config = unet_config_from_diffusers(json.load(fh))
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        state_dict.update(load_state_dict(file))
    return config, convert_diffusers_unet(state_dict, config)
