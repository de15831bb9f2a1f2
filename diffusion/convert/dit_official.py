"""Convert the official PyTorch DiT checkpoints (facebookresearch/DiT) to our Flax DiT.

    state_dict = load_torch_file("DiT-XL-2-256x256.pt")      # no torch needed
    model, variables = load_dit_checkpoint("DiT-XL-2-256x256.pt", "XL/2")
    eps_and_v = model.apply(variables, x, t, y)             # x [B, 32, 32, 4] NHWC

Official key layout -> ours (torch Linear weight [out, in] is our kernel [in, out]):
    x_embedder.proj.{weight,bias}          x_embed      (Conv2d [D, C, p, p] -> [p*p*C, D])
    t_embedder.mlp.{0,2}.{weight,bias}     t_embed/dense{0,1}
    y_embedder.embedding_table.weight      y_embed/table/embedding  (K+1 rows, last = null)
    blocks.N.attn.{qkv,proj}               block_N/{qkv,proj}
    blocks.N.mlp.{fc1,fc2}                 block_N/{fc1,fc2}
    blocks.N.adaLN_modulation.1            block_N/adaLN
      (scan_blocks: blocks/{qkv,proj,fc1,fc2,adaLN}, row N of arrays stacked over blocks)
    final_layer.{linear,adaLN_modulation.1}  final/{linear,adaLN}
    pos_embed                              not a parameter here; checked against ours.

`.pt` files in torch's zip format are read without torch by a restricted unpickler that
rebuilds tensors as numpy arrays and refuses any other Python object; only the legacy
(pre-1.6, non-zip) format needs torch. `.safetensors` needs the `safetensors` package.
"""
from __future__ import annotations

import argparse
import collections
import os
import pickle
import re
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from diffusion.models.dit import DIT_SIZES, DiT, dit_variant, scan_blocks_for, stack_blocks
from diffusion.models.dit_blocks import sincos_pos_embed_2d

# ---------------------------------------------------------------- reading torch files

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _LazyTensor:
    """A tensor of a torch zip archive, read only when materialised: a training
    checkpoint also holds optimizer state that we never want to load."""

    def __init__(self, read, dtype, offset, size, stride):
        self.read, self.dtype = read, dtype
        self.offset, self.size, self.stride = offset, size, stride  # checked in numpy()

    def numpy(self) -> np.ndarray:
        flat = self.read()
        _check_view(len(flat), self.offset, self.size, self.stride)
        self.size, self.stride = tuple(self.size), tuple(self.stride)
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * item for s in self.stride])
        return np.array(view)  # copy: contiguous, owns its memory


def _check_view(numel: int, offset, size, stride) -> None:
    """Refuses a tensor header that would read outside its storage's `numel` elements:
    as_strided trusts shape, stride and offset, and the file is not to be trusted."""
    def ints(xs):
        return isinstance(xs, (tuple, list)) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in xs)
    if not (isinstance(offset, int) and ints(size) and ints(stride)):
        raise ValueError(f"malformed tensor header: offset {offset!r}, size {size!r}, "
                         f"stride {stride!r}")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise ValueError(f"malformed tensor header: offset {offset}, size {size}, "
                         f"stride {stride}")
    if 0 in size:
        return
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    count = int(np.prod(size, dtype=object))
    if last >= numel or count > max(numel, 1):
        raise ValueError(f"malformed tensor header: size {size}, stride {stride}, offset "
                         f"{offset} reach element {last} of a storage of {numel} elements")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not (isinstance(storage, tuple) and len(storage) == 2 and callable(storage[0])):
        raise pickle.UnpicklingError("malformed tensor: its storage is not a storage record")
    read, dtype = storage
    return _LazyTensor(read, dtype, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class _TorchZipUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl, allowing only containers, tensors and argparse args."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.cache: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only tensors, dicts and argparse "
            f"args are read from a checkpoint without torch")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError(f"malformed storage record {pid!r:.80}")
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or storage_type not in _STORAGE_DTYPES or not isinstance(key, str):
            raise pickle.UnpicklingError(f"unknown storage record {pid!r:.80}")
        dtype = np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder(
            "<" if self.byteorder == "little" else ">")

        def read():
            if key not in self.cache:
                name = f"{self.prefix}/data/{key}"
                try:
                    raw = self.archive.read(name)
                except KeyError:
                    raise ValueError(f"malformed torch file: no storage {name!r}") from None
                if len(raw) % dtype.itemsize:
                    raise ValueError(f"malformed torch file: storage {name!r} holds "
                                     f"{len(raw)} bytes, not a whole number of {dtype}")
                self.cache[key] = np.frombuffer(raw, dtype=dtype)
            return self.cache[key]
        return read, dtype


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    return obj


def _select(obj: Any, key: str | None, path: str) -> dict:
    """Picks the state dict inside a checkpoint: {'model', 'ema', 'opt', 'args'} -> ema."""
    if key == "auto":
        if isinstance(obj, dict) and "ema" in obj:
            key = "ema"
        elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
            key = "model"
        elif isinstance(obj, dict) and "state_dict" in obj:
            key = "state_dict"
        else:
            key = None
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise KeyError(f"{path}: no entry {key!r} in the checkpoint")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_torch_file(path: str, key: str | None = "auto") -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict from `.pt`/`.pth`/`.bin` or `.safetensors` as numpy arrays.

    key: for a training checkpoint holding several dicts, which to take; "auto" takes
    'ema', else 'model', else 'state_dict', else the file's top-level dict.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError("reading .safetensors needs `pip install safetensors`") from e
        return dict(load_file(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1:
                raise ValueError(f"{path}: not a torch checkpoint (no single data.pkl)")
            prefix = pkl[0][:-len("/data.pkl")]
            names = set(archive.namelist())
            byteorder = (archive.read(f"{prefix}/byteorder").decode().strip()
                         if f"{prefix}/byteorder" in names else "little")
            try:
                with archive.open(pkl[0]) as f:
                    obj = _TorchZipUnpickler(f, archive, prefix, byteorder).load()
                state = _materialise(_select(obj, key, path))
            except (EOFError, TypeError, ValueError, zipfile.BadZipFile) as e:
                # UnpicklingError (a refused object) and KeyError (_select's) say enough.
                raise ValueError(f"{path}: malformed torch checkpoint: {e}") from e
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path} is a legacy (non-zip) torch file: reading it needs "
                              f"torch (`pip install torch`)") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                 for k, v in _select(obj, key, path).items()}
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
    return state


# ---------------------------------------------------------------- converting


def _strip_prefix(state_dict: dict) -> dict:
    # DistributedDataParallel prefixes every key with "module.".
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def dit_kwargs_from_state_dict(state_dict: dict[str, np.ndarray], variant: str | None = None,
                               input_size: int | None = None,
                               num_heads: int | None = None) -> dict:
    """DiT constructor arguments read off the checkpoint's shapes.

    Heads cannot be read from shapes: they come from num_heads, or `variant` ("XL/2"),
    or else the standard variant of that hidden size. input_size comes from the
    pos_embed buffer when the file has it.
    """
    sd = _strip_prefix(state_dict)
    for k in ("x_embedder.proj.weight", "final_layer.linear.weight"):
        if k not in sd:
            raise ValueError(f"not an official DiT state dict: missing {k!r}")
    hidden, in_channels, p, p2 = sd["x_embedder.proj.weight"].shape
    if p != p2:
        raise ValueError(f"non-square patch embedding kernel {p}x{p2}")
    depth = 1 + max([int(m.group(1)) for k in sd
                     if (m := re.match(r"blocks\.(\d+)\.", k))], default=-1)
    out_channels = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer gives {out_channels} channels for {in_channels} "
                         f"input channels")
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise ValueError("not an official DiT state dict: no blocks.0.mlp.fc1.weight")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    table = sd.get("y_embedder.embedding_table.weight")
    # The official table has num_classes + 1 rows when trained with label dropout
    # (all released checkpoints); that last row is our null class.
    num_classes = 0 if table is None else table.shape[0] - 1
    if "pos_embed" in sd:
        grid = int(round(np.sqrt(sd["pos_embed"].shape[-2])))
        if input_size is not None and input_size != grid * p:
            raise ValueError(f"input_size {input_size} does not match the checkpoint's "
                             f"pos_embed ({grid}x{grid} patches of {p})")
        input_size = grid * p
    if input_size is None:
        raise ValueError("the state dict has no pos_embed: pass input_size")

    if variant is not None:
        v = dit_variant(variant)
        got = dict(hidden_size=hidden, depth=depth, patch_size=p)
        diff = {k: (got[k], v[k]) for k in got if got[k] != v[k]}
        if diff:
            raise ValueError(f"checkpoint does not match variant {variant!r}: "
                             + ", ".join(f"{k} {a} != {b}" for k, (a, b) in diff.items()))
        if num_heads not in (None, v["num_heads"]):
            raise ValueError(f"num_heads {num_heads} contradicts variant {variant!r}")
        num_heads = v["num_heads"]
    elif num_heads is None:
        heads = {h: n for h, _, n in DIT_SIZES.values()}
        if hidden not in heads:
            raise ValueError(f"hidden size {hidden} is not a standard DiT variant: pass "
                             f"variant or num_heads")
        num_heads = heads[hidden]
    return dict(input_size=input_size, patch_size=p, in_channels=in_channels,
                hidden_size=hidden, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                num_classes=num_classes, learn_sigma=out_channels == 2 * in_channels)


def convert_dit_state_dict(state_dict: dict[str, np.ndarray], variant: str | None = None,
                           input_size: int | None = None,
                           num_heads: int | None = None, *, scan_blocks: bool = False) -> dict:
    """Official DiT state dict -> our Flax params (use as {'params': params}), float32.

    scan_blocks: the layout of DiT(scan_blocks=True), every block's arrays stacked on a
    leading [depth] axis under params["blocks"]; else block_0 ... block_{depth-1}.

    Every key must be used exactly once; an unknown or missing key is an error. A
    pos_embed buffer, when present, must equal our fixed sin-cos embedding.
    """
    sd = {k: np.asarray(v, np.float32) for k, v in _strip_prefix(state_dict).items()}
    cfg = dit_kwargs_from_state_dict(sd, variant, input_size, num_heads)
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise ValueError(f"DiT state dict lacks {key!r}")
        used.add(key)
        return sd[key]

    def linear(prefix: str) -> dict:
        return {"kernel": take(prefix + ".weight").T.copy(), "bias": take(prefix + ".bias")}

    p, c, d = cfg["patch_size"], cfg["in_channels"], cfg["hidden_size"]
    # Conv2d weight [D, C, p, p] -> rows ordered (patch row, patch col, channel) like
    # models.dit.patchify.
    w = take("x_embedder.proj.weight").transpose(2, 3, 1, 0).reshape(p * p * c, d)
    params: dict[str, Any] = {
        "x_embed": {"kernel": w, "bias": take("x_embedder.proj.bias")},
        "t_embed": {"dense0": linear("t_embedder.mlp.0"),
                    "dense1": linear("t_embedder.mlp.2")},
    }
    if cfg["num_classes"]:
        params["y_embed"] = {"table": {"embedding": take("y_embedder.embedding_table.weight")}}
    for i in range(cfg["depth"]):
        b = f"blocks.{i}."
        params[f"block_{i}"] = {
            "qkv": linear(b + "attn.qkv"), "proj": linear(b + "attn.proj"),
            "fc1": linear(b + "mlp.fc1"), "fc2": linear(b + "mlp.fc2"),
            "adaLN": linear(b + "adaLN_modulation.1"),
        }
    params["final"] = {"linear": linear("final_layer.linear"),
                       "adaLN": linear("final_layer.adaLN_modulation.1")}
    if scan_blocks:
        params = stack_blocks(params, cfg["depth"])

    if "pos_embed" in sd:
        used.add("pos_embed")
        ours = sincos_pos_embed_2d(d, cfg["input_size"] // p)
        err = np.abs(sd["pos_embed"].reshape(ours.shape) - ours).max()
        if err > 1e-4:
            raise ValueError(f"checkpoint pos_embed differs from the fixed sin-cos "
                             f"embedding by {err:.3g}")
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"unexpected keys in DiT state dict: {unused[:8]}"
                         + (" ..." if len(unused) > 8 else ""))
    return params


def load_dit_checkpoint(path: str, variant: str | None = None,
                        input_size: int | None = None, num_heads: int | None = None,
                        key: str | None = "auto", scan_blocks: str | bool = "auto",
                        **model_kwargs) -> tuple[DiT, dict]:
    """File -> (DiT module, {'params': ...}). model_kwargs: e.g. dtype, remat.

    scan_blocks: "auto" (scanned from depth 12 on, like the configs' default), or a bool.
    """
    sd = load_torch_file(path, key)
    cfg = dit_kwargs_from_state_dict(sd, variant, input_size, num_heads)
    scan = scan_blocks_for(scan_blocks, cfg["depth"])
    params = convert_dit_state_dict(sd, variant, input_size, num_heads, scan_blocks=scan)
    return DiT(**cfg, scan_blocks=scan, **model_kwargs), {"params": params}
