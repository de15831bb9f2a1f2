"""Maps pytorch-fid's Inception state dict onto InceptionV3FID variables.

The weights are the TF 2015-12-05 Inception graph as ported by pytorch-fid, file
`pt_inception-2015-12-05-6726825d.pth` (from the pytorch-fid GitHub release
"fid_weights"). Reading a .pth needs torch, so the file is converted once to an .npz of
the state dict (key -> array) with `python -m diffusion.evaluation.convert_inception`;
everything here reads only the .npz.

The layout below is written out from the pytorch-fid / torchvision architecture, not
derived from our Flax module, so the tests can check one against the other.
Key names: `<layer>.conv.weight` [O, I, kh, kw], `<layer>.bn.{weight, bias,
running_mean, running_var}` [O] (optionally `.bn.num_batches_tracked`, ignored), and
`fc.weight` [1008, 2048], `fc.bias` [1008].
"""

from __future__ import annotations

from typing import Any

import numpy as np

# (name, out_channels, in_channels or None for the block input, kh, kw)
_BLOCK_A = [("branch1x1", 64, None, 1, 1), ("branch5x5_1", 48, None, 1, 1),
            ("branch5x5_2", 64, 48, 5, 5), ("branch3x3dbl_1", 64, None, 1, 1),
            ("branch3x3dbl_2", 96, 64, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)]
_BLOCK_B = [("branch3x3", 384, None, 3, 3), ("branch3x3dbl_1", 64, None, 1, 1),
            ("branch3x3dbl_2", 96, 64, 3, 3), ("branch3x3dbl_3", 96, 96, 3, 3)]
_BLOCK_D = [("branch3x3_1", 192, None, 1, 1), ("branch3x3_2", 320, 192, 3, 3),
            ("branch7x7x3_1", 192, None, 1, 1), ("branch7x7x3_2", 192, 192, 1, 7),
            ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3, 3)]
_BLOCK_E = [("branch1x1", 320, None, 1, 1), ("branch3x3_1", 384, None, 1, 1),
            ("branch3x3_2a", 384, 384, 1, 3), ("branch3x3_2b", 384, 384, 3, 1),
            ("branch3x3dbl_1", 448, None, 1, 1), ("branch3x3dbl_2", 384, 448, 3, 3),
            ("branch3x3dbl_3a", 384, 384, 1, 3), ("branch3x3dbl_3b", 384, 384, 3, 1),
            ("branch_pool", 192, None, 1, 1)]


def _block_c(c7: int) -> list[tuple[str, int, int | None, int, int]]:
    return [("branch1x1", 192, None, 1, 1), ("branch7x7_1", c7, None, 1, 1),
            ("branch7x7_2", c7, c7, 1, 7), ("branch7x7_3", 192, c7, 7, 1),
            ("branch7x7dbl_1", c7, None, 1, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
            ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1),
            ("branch7x7dbl_5", 192, c7, 1, 7), ("branch_pool", 192, None, 1, 1)]


def _conv_layers() -> list[tuple[str, int, int, int, int]]:
    """Every BasicConv2d of the FID Inception as (torch prefix, O, I, kh, kw)."""
    layers = [("Conv2d_1a_3x3", 32, 3, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
              ("Conv2d_2b_3x3", 64, 32, 3, 3), ("Conv2d_3b_1x1", 80, 64, 1, 1),
              ("Conv2d_4a_3x3", 192, 80, 3, 3)]
    blocks = [
        ("Mixed_5b", 192, _BLOCK_A + [("branch_pool", 32, None, 1, 1)]),
        ("Mixed_5c", 256, _BLOCK_A + [("branch_pool", 64, None, 1, 1)]),
        ("Mixed_5d", 288, _BLOCK_A + [("branch_pool", 64, None, 1, 1)]),
        ("Mixed_6a", 288, _BLOCK_B),
        ("Mixed_6b", 768, _block_c(128)), ("Mixed_6c", 768, _block_c(160)),
        ("Mixed_6d", 768, _block_c(160)), ("Mixed_6e", 768, _block_c(192)),
        ("Mixed_7a", 768, _BLOCK_D),
        ("Mixed_7b", 1280, _BLOCK_E), ("Mixed_7c", 2048, _BLOCK_E),
    ]
    for block, block_in, convs in blocks:
        for name, out, cin, kh, kw in convs:
            layers.append((f"{block}.{name}", out, block_in if cin is None else cin, kh, kw))
    return layers


CONV_LAYERS = _conv_layers()


def pytorch_fid_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of pytorch-fid's FID Inception state dict with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, out, cin, kh, kw in CONV_LAYERS:
        shapes[f"{prefix}.conv.weight"] = (out, cin, kh, kw)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{stat}"] = (out,)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def _set(tree: dict, path: list[str], value: np.ndarray) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def state_dict_to_variables(state_dict: dict[str, np.ndarray]) -> dict[str, Any]:
    """Converts a pytorch-fid state dict (key -> array) into {'params', 'batch_stats'}.

    Strict: a missing key, an unknown key, or a wrong shape is an error naming the key.
    """
    expected = pytorch_fid_state_dict_shapes()
    keys = {k for k in state_dict if not k.endswith(".num_batches_tracked")}
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    if missing or unexpected:
        raise ValueError(f"not a pytorch-fid Inception state dict: {len(missing)} missing "
                         f"keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
                         f"(e.g. {unexpected[:3]})")
    params: dict = {}
    batch_stats: dict = {}
    for key, shape in expected.items():
        value = np.asarray(state_dict[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"{key}: expected shape {shape}, got {value.shape}")
        if key.startswith("fc."):
            # torch Linear stores [out, in]; flax Dense kernels are [in, out].
            _set(params, ["fc", "kernel" if key == "fc.weight" else "bias"],
                 value.T if key == "fc.weight" else value)
            continue
        prefix, module, leaf = key.rsplit(".", 2)
        path = prefix.split(".") + [module]
        if module == "conv":
            # torch conv [O, I, kh, kw] -> flax [kh, kw, I, O].
            _set(params, path + ["kernel"], np.transpose(value, (2, 3, 1, 0)))
        elif leaf in ("weight", "bias"):
            _set(params, path + ["scale" if leaf == "weight" else "bias"], value)
        else:
            _set(batch_stats, path + ["mean" if leaf == "running_mean" else "var"], value)
    return {"params": params, "batch_stats": batch_stats}


def variables_to_state_dict_keys(variables: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Inverse naming: the pytorch-fid key and torch-layout shape of every leaf of
    InceptionV3FID variables (arrays or ShapeDtypeStructs). Used to check coverage."""
    out: dict[str, tuple[int, ...]] = {}

    def walk(tree: dict, path: list[str], collection: str) -> None:
        for name, value in tree.items():
            if isinstance(value, dict):
                walk(value, path + [name], collection)
                continue
            shape = tuple(value.shape)
            if path == ["fc"]:
                key, shape = f"fc.{'weight' if name == 'kernel' else 'bias'}", shape[::-1]
            elif name == "kernel":
                key, shape = ".".join(path) + ".weight", (shape[3], shape[2], shape[0], shape[1])
            else:
                leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean",
                        "var": "running_var"}[name]
                key = ".".join(path) + "." + leaf
            out[key] = shape

    walk(dict(variables["params"]), [], "params")
    walk(dict(variables["batch_stats"]), [], "batch_stats")
    return out


def load_inception_weights(path: str) -> dict[str, Any]:
    """Reads the .npz made by convert_inception and returns InceptionV3FID variables."""
    if path.endswith(".pth"):
        raise ValueError(f"{path} is a torch file; convert it first with "
                         "`python -m diffusion.evaluation.convert_inception --in "
                         f"{path} --out inception_fid.npz` (needs torch once)")
    with np.load(path, allow_pickle=False) as data:
        state_dict = {k: data[k] for k in data.files}
    return state_dict_to_variables(state_dict)
