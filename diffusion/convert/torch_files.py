"""Read PyTorch weight files into `dict[str, np.ndarray]`.

`.safetensors` needs only numpy (plus the `safetensors` package when installed);
`.pt` / `.pth` / `.bin` / `.ckpt` are pickles and need PyTorch. bfloat16 tensors come
back as float32, since numpy has no bfloat16 of its own.
"""
from __future__ import annotations

import json
import os

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# safetensors dtype codes -> numpy dtypes (BF16 is handled separately).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}
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
    """Read with `safetensors.numpy`, or with a plain reader of the format when the
    package is missing or the file holds dtypes numpy lacks (bfloat16)."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        return _read_safetensors(path)
    try:
        tensors = load_file(path)
    except TypeError:  # "data type 'bfloat16' not understood" (ml_dtypes not loaded)
        return _read_safetensors(path)
    # Once JAX has imported ml_dtypes, numpy knows bfloat16 and safetensors returns it;
    # callers get float32 either way.
    return {k: v.astype(np.float32) if v.dtype.name in _EXOTIC_FLOATS else v
            for k, v in tensors.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    # Format: u64 little-endian header length, a JSON header mapping names to
    # {dtype, shape, data_offsets=[begin, end]} relative to the end of the header.
    # Nothing in the file is trusted: the header length, offsets and shapes are checked
    # against the bytes actually there before any array is built.
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"{path}: malformed safetensors file: header of {n} bytes in "
                             f"a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed safetensors header: {e}") from e
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"{path}: malformed safetensors header (not a JSON object)")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed safetensors entry {name!r}: {e}") from e
        itemsize = 2 if dtype == "BF16" else np.dtype(_ST_DTYPES.get(dtype, np.uint8)).itemsize
        count = int(np.prod(shape, dtype=object))
        if (min(shape, default=0) < 0 or not 0 <= begin <= end <= len(data)
                or end - begin != count * itemsize):
            raise ValueError(f"{path}: malformed safetensors entry {name!r}: shape {shape} "
                             f"of {dtype} at bytes [{begin}, {end}) of {len(data)}")
        raw = data[begin:end]
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: shift the bits up.
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _ST_DTYPES:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        out[name] = arr.reshape(shape).copy()
    return out


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
