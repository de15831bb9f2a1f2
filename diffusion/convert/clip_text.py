"""Convert transformers' `CLIPTextModel` weights (an SD checkpoint's `text_encoder/`
folder: config.json + model.safetensors) to our Flax `CLIPTextModel` params.

Keys are transformers' with the `text_model.` prefix that transformers 4 wrote (every
published SD checkpoint) or without it (transformers 5 saves the model flat). Linear
weights go from [out, in] to [in, out] kernels, LayerNorm weights to 'scale', embedding
tables stay as they are. The `embeddings.position_ids` buffer of old files is ignored.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.convert.params import flax_path, unflatten
from diffusion.convert.torch_files import load_state_dict
from diffusion.models.clip_text import (CLIPTextConfig, CLIPTextModel, read_text_config,
                                       text_encoder_folder)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = "model.safetensors.index.json"
_PREFIX = "text_model."
_IGNORED = ("embeddings.position_ids",)
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def _template(config: CLIPTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Path -> shape of every parameter of the module, by abstract evaluation."""
    shapes = jax.eval_shape(CLIPTextModel(config).init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def convert_clip_text(state_dict: Mapping[str, np.ndarray],
                      config: CLIPTextConfig) -> dict:
    """transformers CLIPTextModel state dict -> our params tree (numpy float32).

    Every parameter must be filled, every key used and every shape match the config;
    else one ValueError lists the missing parameters, unexpected keys and mismatches.
    """
    template = _template(config)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, seen = [], [], set()
    for key, value in state_dict.items():
        name = key.removeprefix(_PREFIX)
        if name in _IGNORED:
            continue
        *module, leaf = flax_path(name)
        candidates = {"weight": _WEIGHT_LEAVES, "bias": ("bias",)}.get(leaf, ())
        target = next((tuple(module) + (c,) for c in candidates
                       if tuple(module) + (c,) in template), None)
        if target is None or target in seen:  # also a key given with and without prefix
            unexpected.append(key)
            continue
        seen.add(target)
        value = np.asarray(value, dtype=np.float32)
        shape = template[target]
        if target[-1] == "kernel":
            shape = shape[::-1]  # the file's [out, in]
        if value.shape != shape:
            mismatched.append(f"{key}: {value.shape} in the file, the config needs {shape}")
            continue
        flat[target] = value.T if target[-1] == "kernel" else value
    missing = sorted("/".join(p) for p in template if p not in seen)
    if unexpected or missing or mismatched:
        raise ValueError(
            f"state dict does not match the CLIP text config: {len(missing)} missing "
            f"params {missing[:8]}, {len(unexpected)} unexpected keys "
            f"{sorted(unexpected)[:8]}, {len(mismatched)} shape mismatches {mismatched[:8]}")
    return unflatten(flat)


def _find_weights(folder: str) -> list[str]:
    index = os.path.join(folder, SHARD_INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(folder, s) for s in shards]
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES + (SHARD_INDEX,))} in {folder}")


def load_clip_text(path: str | os.PathLike, dtype: Any = jnp.float32
                   ) -> tuple[CLIPTextModel, dict]:
    """(module, params) from a transformers CLIPTextModel folder (config.json + weights),
    or an SD pipeline folder with a `text_encoder/` subfolder. dtype: the activations'
    (params stay float32). Use as `module.apply({'params': params}, ids)`."""
    folder = text_encoder_folder(path)
    config = read_text_config(folder)
    state_dict: dict[str, np.ndarray] = {}
    for file in _find_weights(folder):
        state_dict.update(load_state_dict(file))
    try:
        params = convert_clip_text(state_dict, config)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e
    return CLIPTextModel(config, dtype=dtype), params
