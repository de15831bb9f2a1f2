"""Image grids and PNG files for sample sheets.

Images arrive as float32 [N, H, W, C] in [-1, 1] (the project's convention) or as
uint8; a grid is uint8 [H', W', C] with `padding` pixels of black between and
around the tiles. One-channel images stay one-channel; `save_png` writes them as
greyscale.
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 in [0, 255] (clipped, NaN -> mid-grey); uint8 as is."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"images must be float in [-1, 1] or uint8, got dtype {x.dtype}")
    x = np.nan_to_num(x.astype(np.float32), nan=0.0)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tiles [N, H, W, C] images into one uint8 [H', W', C] image, `nrow` per row.

    nrow defaults to ceil(sqrt(N)), giving a near-square sheet. With R rows,
    H' = R * H + (R + 1) * padding and W' = nrow * W + (nrow + 1) * padding.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"make_grid expects images [N, H, W, C], got shape {x.shape}")
    n, h, w, c = x.shape
    if n == 0:
        raise ValueError("make_grid got zero images")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else int(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    x = to_uint8(x)
    grid = np.zeros((rows * h + (rows + 1) * padding, nrow * w + (nrow + 1) * padding, c),
                    np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = x[i]
    return grid


def save_png(path: str, grid: np.ndarray) -> None:
    """Writes a uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] image as PNG."""
    x = np.asarray(grid)
    if x.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8 (use make_grid or to_uint8), got {x.dtype}")
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (3, 4))):
        raise ValueError(f"save_png expects [H, W] or [H, W, 1|3|4], got shape {grid.shape}")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(x).save(path, format="PNG")
