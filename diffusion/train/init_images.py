"""Images to start from (image-to-image) or to inpaint, for sample mode.

Errors are ConfigErrors naming the key (launch.py exits 2).

`sample.init_images`: an .npz whose `arr_0` is [N, H, W, C] uint8 (0..255: the layout of
the sample files written here, ADM's and DiT's) or float in [-1, 1], or a directory of
PNG files (sorted by name, each [H, W] grayscale, RGB or RGBA). Channels are matched to
the model's (RGB -> 1 channel averages, grayscale -> 3 repeats); sizes must match, since
a resize would silently change what "keep these pixels" means. Sample i starts from
image i % N.

`sample.mask` (inpainting, 1 = keep the known pixel of the init image, 0 = sample it): a
PNG (white keeps) or an .npz (`arr_0` or `mask`: [H, W], [H, W, 1 or C] or
[N, H, W, 1 or C]); uint8 values are divided by 255. Returned with a leading axis:
[1 or N, H, W, 1 or C].
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image

from diffusion.config_file import ConfigError


def _match_channels(x: np.ndarray, channels: int, what: str) -> np.ndarray:
    """x [..., c] -> [..., channels]: alpha dropped, RGB averaged, gray repeated."""
    c = x.shape[-1]
    if c == channels:
        return x
    if c in (2, 4):  # gray + alpha, RGBA: drop alpha
        return _match_channels(x[..., :-1], channels, what)
    if c == 3 and channels == 1:
        return x.mean(-1, keepdims=True)
    if c == 1:
        return np.repeat(x, channels, axis=-1)
    raise ConfigError(f"{what} has {c} channels; the model samples {channels}")


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def _read_npz(path: str, keys: tuple) -> np.ndarray:
    with np.load(path) as f:
        for key in keys:
            if key in f.files:
                return f[key]
        raise ConfigError(f"{path} holds no array named {' or '.join(keys)} "
                         f"(it has {f.files})")


def _to_unit(a: np.ndarray, path: str, lo: float) -> np.ndarray:
    """uint8 -> [lo, 1] (lo -1 for images, 0 for masks); floats checked to lie there."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0 * (1.0 - lo) + lo
    a = a.astype(np.float32)
    if a.size and not (a.min() >= lo - 1e-3 and a.max() <= 1.0 + 1e-3):
        raise ConfigError(f"{path}: float values must lie in [{lo:g}, 1], got "
                         f"[{a.min():.3g}, {a.max():.3g}] (or store uint8 0..255)")
    return a


def load_init_images(path: str, image_shape: tuple) -> np.ndarray:
    """float32 [N, H, W, C] in [-1, 1] from an .npz or a directory of PNGs (see above)."""
    h, w, c = image_shape
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
        if not names:
            raise ConfigError(f"sample.init_images={path!r}: the directory holds no .png")
        images = [_read_png(os.path.join(path, n)) for n in names]
        shapes = {im.shape[:2] for im in images}
        if len(shapes) > 1:
            raise ConfigError(f"{path}: the PNGs differ in size: {sorted(shapes)}")
        x = np.stack([_match_channels(im, c, path) for im in images]).astype(np.uint8)
    elif os.path.isfile(path):
        x = _read_npz(path, ("arr_0",))
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ConfigError(f"{path}: arr_0 must be [N, H, W, C], got shape {x.shape}")
        x = _match_channels(x, c, path) if x.dtype == np.uint8 else x
    else:
        raise ConfigError(f"sample.init_images={path!r} is neither an .npz file nor "
                                "a directory of PNGs")
    x = _to_unit(x, path, -1.0)
    if tuple(x.shape[1:3]) != (h, w) or x.shape[-1] != c:
        raise ConfigError(f"{path}: images are {tuple(x.shape[1:])}, the model samples "
                         f"{tuple(image_shape)} (H, W, C)")
    return x


def load_mask(path: str, image_shape: tuple) -> np.ndarray:
    """float32 [1 or N, H, W, 1 or C] in [0, 1] from a PNG or an .npz (see above)."""
    h, w, c = image_shape
    if not os.path.isfile(path):
        raise ConfigError(f"sample.mask={path!r}: no such file (a PNG or an .npz)")
    if path.lower().endswith(".png"):
        m = _read_png(path)
        m = _match_channels(m, 1, path) if m.shape[-1] != c else m
        m = m.astype(np.uint8)[None]
    else:
        m = _read_npz(path, ("arr_0", "mask"))
        m = m[..., None] if m.ndim == 2 else m
        m = m[None] if m.ndim == 3 else m
    m = _to_unit(m, path, 0.0)
    if m.ndim != 4 or tuple(m.shape[1:3]) != (h, w) or m.shape[-1] not in (1, c):
        raise ConfigError(f"{path}: mask of shape {m.shape[1:]} does not fit images "
                         f"{tuple(image_shape)}: give [H, W], [H, W, 1 or C] or "
                         "[N, H, W, 1 or C]")
    return m


def load_sample_inputs(sample, image_shape: tuple) -> tuple[Optional[np.ndarray],
                                                            Optional[np.ndarray]]:
    """(init images or None, mask or None) of a config's `sample` section, with the
    combinations checked: strength < 1 and a mask need init images."""
    path, mask_path = sample.get("init_images", ""), sample.get("mask", "")
    strength = float(sample.get("strength", 1.0))
    if not path:
        if strength < 1.0 or mask_path:
            raise ConfigError(f"{'sample.mask' if mask_path else 'sample.strength < 1'} "
                             "needs the images to start from: set sample.init_images "
                             "(an .npz or a directory of PNGs)")
        return None, None
    x = load_init_images(path, image_shape)
    m = load_mask(mask_path, image_shape) if mask_path else None
    if m is not None and m.shape[0] not in (1, x.shape[0]):
        raise ConfigError(f"sample.mask holds {m.shape[0]} masks for {x.shape[0]} init "
                         "images: give one mask or one per image")
    if m is None and strength == 1.0:
        raise ConfigError("sample.init_images without sample.mask needs sample.strength "
                         "< 1 (the fraction of the noise levels to run, image-to-image)")
    return x, m
