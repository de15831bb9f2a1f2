"""Convert diffusers' `AutoencoderKL` weights to our Flax `AutoencoderKL` params.

Our module names mirror diffusers' keys with list indices folded into the previous
name, so `encoder.down_blocks.0.resnets.1.conv1.weight` becomes
params['encoder']['down_blocks_0']['resnets_1']['conv1']['kernel']. Conv weights go
from OIHW to HWIO, dense weights from [out, in] to [in, out], norm weights to 'scale'.

Also accepted: diffusers' older attention names (query/key/value/proj_attn), and the
original LDM / CompVis layout (`encoder.down.0.block.0...`, `mid.attn_1.q`, also with
the `first_stage_model.` prefix of a full SD checkpoint), renamed to diffusers' first.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.convert.params import fill_params
from diffusion.convert.torch_files import load_state_dict
from diffusion.models.vae import AutoencoderKL

SD_SCALE_FACTOR = 0.18215
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                        "proj_attn": "to_out.0"}
_LDM_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
                        "proj_out": "to_out.0"}


def vae_from_config(config: Mapping[str, Any], dtype: Any = jnp.float32) -> AutoencoderKL:
    """Build our module from a diffusers AutoencoderKL config (its config.json)."""
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in config.get(key, ()) if t != allowed]
        if bad:
            raise ValueError(f"unsupported {key} {bad}: only {allowed} is implemented")
    if config.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported act_fn {config['act_fn']!r}: only 'silu'")
    if config.get("shift_factor") not in (None, 0, 0.0):
        raise ValueError(f"shift_factor={config['shift_factor']} is not supported: latents "
                         "would need (z - shift) * scale, which load_sd_vae does not return")
    if config.get("latents_mean") is not None:
        raise ValueError("per-channel latents_mean/latents_std are not supported")
    return AutoencoderKL(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        dtype=dtype)


def _ldm_to_diffusers_key(key: str, num_levels: int) -> str:
    """Rename one original-LDM key to diffusers' layout."""
    key = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.",
                 lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", key)
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_LDM_ATTENTION_NAMES[m[2]]}.{m[3]}"
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    # LDM numbers decoder levels by resolution (up.0 is the highest, applied last);
    # diffusers numbers them in the order they run.
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                 lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                 lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


def to_diffusers_layout(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Normalise key names: drop a `first_stage_model.` prefix, rename LDM and old
    diffusers attention names. Keys of training losses (`loss.*`) are dropped."""
    sd = {}
    for k, v in state_dict.items():
        k = k.removeprefix("first_stage_model.")
        if k.startswith("loss."):
            continue  # LDM checkpoints carry the discriminator/LPIPS weights
        sd[k] = v
    if any(re.match(r"^(encoder|decoder)\.(down|up|mid)\.", k) for k in sd):
        levels = {int(m[1]) for k in sd if (m := re.match(r"^encoder\.down\.(\d+)\.", k))}
        sd = {_ldm_to_diffusers_key(k, len(levels)): v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        m = re.match(r"^(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        if m:
            k = f"{m[1]}.{_OLD_ATTENTION_NAMES[m[2]]}.{m[3]}"
        out[k] = v
    return out


def convert_diffusers_vae(state_dict: Mapping[str, np.ndarray],
                          config: AutoencoderKL | Mapping[str, Any]) -> dict:
    """diffusers AutoencoderKL state dict -> our `params` tree (numpy float32 leaves).

    config: our module, or a diffusers config dict. Every parameter of the module must
    be filled and every key used, else a ValueError lists the offenders.
    Use as `module.apply({'params': params}, x, method='encode')`.
    """
    module = config if isinstance(config, AutoencoderKL) else vae_from_config(config)
    f = module.downsample_factor
    template = jax.eval_shape(module.init, jax.random.key(0),
                              jnp.zeros((1, f, f, module.in_channels)))["params"]
    return fill_params(to_diffusers_layout(state_dict), template, "VAE")


def load_sd_vae(path: str | os.PathLike, config: Mapping[str, Any] | None = None,
                dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict, float]:
    """Load a diffusers-format VAE (e.g. stabilityai/sd-vae-ft-ema or -ft-mse).

    path: a diffusers model folder (config.json + diffusion_pytorch_model.safetensors
    or .bin; a pipeline folder with a `vae/` subfolder also works), or one weight file
    (.safetensors/.pt/.bin/.ckpt, diffusers or LDM layout). A file without a
    config.json beside it gets SD's VAE config. Returns (module, params, scale_factor),
    scale_factor from the config's `scaling_factor` (default 0.18215).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        folder = os.path.join(path, "vae") if not _has_weights(path) and \
            os.path.isdir(os.path.join(path, "vae")) else path
        weights = next((os.path.join(folder, w) for w in WEIGHT_FILES
                        if os.path.isfile(os.path.join(folder, w))), None)
        if weights is None:
            raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {folder}")
    elif os.path.isfile(path):
        folder, weights = os.path.dirname(path), path
    else:
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if config is None:
        cfg_file = os.path.join(folder, "config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as fh:
                config = json.load(fh)
        else:
            config = sd_vae_config()
    module = vae_from_config(config, dtype=dtype)
    params = convert_diffusers_vae(load_state_dict(weights), module)
    scale = config.get("scaling_factor") or SD_SCALE_FACTOR
    return module, params, float(scale)


def _has_weights(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, w)) for w in WEIGHT_FILES)


def sd_vae_config() -> dict[str, Any]:
    """diffusers config of Stable Diffusion 1.x / 2.x's VAE (sd-vae-ft-ema/-mse)."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "norm_num_groups": 32, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": SD_SCALE_FACTOR,
    }
