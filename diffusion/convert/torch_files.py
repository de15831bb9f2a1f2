"""Read PyTorch weight files into `dict[str, np.ndarray]`.

`.safetensors` is read by the `safetensors` package (numpy arrays, no torch);
`.pt` / `.pth` / `.bin` / `.ckpt` are pickles and need PyTorch. bfloat16 tensors come
back as float32.
"""
from __future__ import annotations

import os

# Imported for its side effect: numpy learns bfloat16 and the float8 types, which
# safetensors.numpy then returns instead of failing on them.
import ml_dtypes  # noqa: F401
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

_EXOTIC_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a flat state dict from a .safetensors or a torch pickle (.pt/.bin/.ckpt)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return load_torch_pickle(path)
    raise ValueError(f"unknown weight file type {path!r}: expected .safetensors or one "
                     f"of {', '.join(TORCH_SUFFIXES)}")


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read with `safetensors.numpy`, whose Rust reader checks the header (its length,
    offsets, shapes and dtypes) against the bytes in the file before any array is built;
    a malformed file is a ValueError naming it. bfloat16/float8 come back as float32."""
    try:
        tensors = load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: malformed safetensors file: {e}") from e
    return {k: v.astype(np.float32) if v.dtype.name in _EXOTIC_FLOATS else v
            for k, v in tensors.items()}


def load_torch_pickle(path: str) -> dict[str, np.ndarray]:
    """torch.load a checkpoint; unwraps LDM's {'state_dict': ...} wrapper."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path!r} needs PyTorch (`pip install torch`); "
                          "alternatively convert it to .safetensors elsewhere") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. optimizer counters stored next to the weights
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[name] = value.numpy().copy()
    return out
