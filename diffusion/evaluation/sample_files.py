"""Sample and reference files in the layout of ADM's evaluator and DiT's sample_ddp.py.

A sample file is an .npz with `arr_0`: uint8 images [N, H, W, C] (NHWC, 0..255) and,
for class-conditional samples, `arr_1`: int labels [N]. Images keep their own channels:
grayscale samples are [N, H, W, 1] (ADM's TensorFlow evaluator wants 3 channels: give
it `np.repeat(x, 3, axis=-1)`; our `python -m diffusion.evaluation.fid` takes both).

A statistics file holds `mu` [D] and `sigma` [D, D] of a feature network's pool
features (frechet.save_stats; older files of this project say `cov` for `sigma`), and
may say which network in `feature_name`. ADM's reference batches carry both `arr_0`
and Inception `mu` / `sigma`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np


def _check_images(images: np.ndarray, where: str, rgb_or_grey: bool = True) -> None:
    """Feature networks take 1 or 3 channels; a sample file may hold any (synthetic data)."""
    if (images.dtype != np.uint8 or images.ndim != 4
            or (rgb_or_grey and images.shape[-1] not in (1, 3))):
        raise ValueError(f"{where} must be uint8 images [N, H, W, C]"
                         f"{' with C = 1 or 3' if rgb_or_grey else ''}, got "
                         f"{images.dtype} {tuple(images.shape)}")


def save_samples(path: str, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes arr_0 = images (uint8 [N, H, W, C]) and arr_1 = labels [N] if given,
    atomically (a killed job never leaves a truncated file under the final name)."""
    _check_images(np.asarray(images), "samples", rgb_or_grey=False)
    arrays = {"arr_0": np.asarray(images)}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be [N] = [{len(images)}], got {labels.shape}")
        arrays["arr_1"] = labels
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_batch(path: str) -> dict[str, Any]:
    """Reads a sample file or a statistics file (or an ADM reference batch: both).

    Returns any of: images (uint8 [N, H, W, C]), labels [N], mu [D], sigma [D, D],
    feature_name (str, "" when the file does not say).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        out: dict[str, Any] = {}
        # "images" / "labels": the keys of this project's sample files before arr_0/arr_1.
        for key, name in (("arr_0", "images"), ("images", "images"), ("arr_1", "labels"),
                          ("labels", "labels")):
            if key in files and name not in out:
                out[name] = data[key]
        if "mu" in files:
            sigma = "sigma" if "sigma" in files else "cov"
            if sigma not in files:
                raise ValueError(f"{path} has 'mu' but no 'sigma' array")
            out["mu"], out["sigma"] = data["mu"], data[sigma]
            out["feature_name"] = str(data["feature_name"]) if "feature_name" in files else ""
    if "images" not in out and "mu" not in out:
        raise ValueError(f"{path} holds neither images (arr_0) nor statistics (mu, sigma); "
                         f"its arrays: {sorted(files)}")
    if "images" in out:
        _check_images(out["images"], f"{path}: arr_0")
    return out
