"""Fill a Flax `params` tree from a PyTorch-layout state dict whose keys mirror our
module names.

Converters of diffusers models name our submodules after the torch keys with list
indices folded into the previous name (`down_blocks.0.resnets.1.conv1.weight` ->
('down_blocks_0', 'resnets_1', 'conv1', 'kernel')), so the mapping is mechanical:
conv weights OIHW -> HWIO, dense weights [out, in] -> [in, out], norm weights ->
'scale'. `fill_params` does that against the shapes of a module's template and names
every missing parameter, unexpected key and shape mismatch.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

_LEAF_CANDIDATES = {"weight": ("kernel", "scale"), "bias": ("bias",)}


def flax_path(key: str) -> tuple[str, ...]:
    """'a.b.0.c.weight' -> ('a', 'b_0', 'c', 'weight'): fold indices into names."""
    parts: list[str] = []
    for tok in key.split("."):
        if tok.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{tok}"
        else:
            parts.append(tok)
    return tuple(parts)


def convert_leaf(key: str, value: np.ndarray, target_name: str,
                 target_shape: tuple[int, ...]) -> np.ndarray:
    """One torch tensor -> our layout (float32), checked against the target shape.

    A 4-D conv weight becomes HWIO; a 2-D target 'kernel' takes a [out, in] linear
    weight or a 1x1 conv weight [out, in, 1, 1] (used as a dense layer)."""
    value = np.asarray(value, dtype=np.float32)
    if target_name == "kernel" and len(target_shape) == 4:
        if value.ndim != 4:
            raise ValueError(f"{key}: a {value.shape} tensor cannot fill a conv kernel of "
                             f"shape {tuple(target_shape)} (HWIO)")
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif target_name == "kernel" and len(target_shape) == 2:
        if value.ndim == 4:  # a 1x1 conv used as a dense layer
            if value.shape[2:] != (1, 1):
                raise ValueError(f"{key}: cannot use a {value.shape} conv as a dense layer")
            value = value[:, :, 0, 0]
        value = value.T
    if value.shape != tuple(target_shape):
        raise ValueError(f"{key}: converted shape {value.shape} does not match the "
                         f"module's {target_name} shape {tuple(target_shape)}")
    return value


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Nested mapping -> (path, leaf) pairs."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """(path, leaf) mapping -> nested dict."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def fill_params(state_dict: Mapping[str, np.ndarray], template: Mapping,
                what: str) -> dict:
    """state dict (torch layout, our names with dotted indices) -> params tree.

    template: the module's params tree (arrays or ShapeDtypeStructs, e.g. from
    `jax.eval_shape(module.init, ...)['params']`). Every template leaf must be filled
    and every key used, else a ValueError names the offenders; `what` names the model
    in that message.
    """
    flat_template = {path: tuple(leaf.shape) for path, leaf in flatten(template)}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        *mod, leaf = flax_path(key)
        target = next((tuple(mod) + (c,) for c in _LEAF_CANDIDATES.get(leaf, ())
                       if tuple(mod) + (c,) in flat_template), None)
        if target is None:
            unexpected.append(key)
            continue
        flat[target] = convert_leaf(key, value, target[-1], flat_template[target])
    missing = sorted("/".join(p) for p in flat_template if p not in flat)
    if unexpected or missing:
        raise ValueError(f"state dict does not match the {what} config: "
                         f"{len(unexpected)} unexpected keys {sorted(unexpected)[:8]}, "
                         f"{len(missing)} missing params {missing[:8]}")
    return unflatten(flat)
