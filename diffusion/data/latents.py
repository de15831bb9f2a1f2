"""Latent datasets: the reading side (`LatentSource`) and the on-disk format.

A latent dataset is a folder written by `python -m diffusion.autoencoder.encode`:

  manifest.json            format_version, num_examples, shard_size, num_shards,
                           image_shape, latent_shape, num_classes, dtype, scale_factor,
                           complete, info (the VAE, source and split it came from)
  shard-00000/mean.npy     float [n_k, h, w, c]  posterior mean of q(z|x), unscaled
              std.npy      float [n_k, h, w, c]  posterior std
              label.npy    int32 [n_k]           (-1 for an unlabelled source)
              index.npy    int64 [n_k]           the example indices [k*S, k*S + n_k)
  shard-00001/ ...         shard k holds examples [k*S, min((k+1)*S, N)), S = shard_size

Each array is a plain `.npy` file, opened with `np.load(path, mmap_mode="r")`: reading
a batch touches only its rows. A shard folder is written under a temporary name and
renamed into place, so a shard folder that exists is complete; opening one checks its
arrays' shapes, dtypes and indices against the manifest, and a truncated or corrupt
file is an error naming it.

Format 1 (`latents-00000.npz` shards) is not read: its error says the command that
re-encodes the dataset.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
ARRAYS = ("mean", "std", "label", "index")
ENCODE_COMMAND = "python -m diffusion.autoencoder.encode"


def shard_dir(k: int) -> str:
    """Name of shard k's folder inside a latent dataset."""
    return f"shard-{k:05d}"


def read_manifest(out_dir: str) -> dict | None:
    """The manifest of the latent dataset in out_dir, or None when there is none."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): a corrupt latent dataset "
                         "manifest") from e


def reencode_command(manifest: dict, out_dir: str) -> str:
    """The encoder command that rebuilds the dataset the manifest describes (as far as
    the manifest records its arguments)."""
    info = manifest.get("info", {})
    args = [ENCODE_COMMAND, f"--vae={info.get('vae', 'VAE')}",
            f"--source={info.get('source', 'SOURCE')}", f"--split={info.get('split', 'train')}"]
    if info.get("data_dir"):
        args.append(f"--data_dir={info['data_dir']}")
    h, w = (manifest.get("image_shape") or [0, 0])[:2]
    if h and h == w:
        args.append(f"--image_size={h}")
    args += [f"--shard_size={manifest.get('shard_size', 4096)}",
             f"--dtype={manifest.get('dtype', 'float32')}", f"--out={out_dir}"]
    return " ".join(args)


def check_format(manifest: dict, out_dir: str) -> None:
    """Raises a ValueError naming the re-encode command for a dataset of another format."""
    version = manifest.get("format_version")
    if version == FORMAT_VERSION:
        return
    raise ValueError(
        f"the latent dataset in {out_dir} has format_version {version} (.npz shards), which "
        f"this version does not read (format {FORMAT_VERSION}: .npy shards); re-encode it "
        f"into a new folder:\n  {reencode_command(manifest, out_dir + '_v2')}")


def shard_rows(manifest: dict, k: int) -> tuple[int, int]:
    """[lo, hi): the example indices shard k holds."""
    n, size = int(manifest["num_examples"]), int(manifest["shard_size"])
    return k * size, min((k + 1) * size, n)


def load_shard(out_dir: str, k: int, manifest: dict) -> dict[str, np.ndarray]:
    """Shard k's arrays, memory-mapped read-only, after checking them against the
    manifest: rows, latent shape (when the manifest has one), dtypes and indices."""
    folder = os.path.join(out_dir, shard_dir(k))
    redo = (f"delete {folder} and rerun the encoder ({ENCODE_COMMAND} with the same "
            "arguments) to write it again")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"latent shard {folder} is missing; {redo}")
    lo, hi = shard_rows(manifest, k)
    out = {}
    for name in ARRAYS:
        path = os.path.join(folder, f"{name}.npy")
        try:
            out[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"latent shard file {path} is missing; {redo}") from e
        except (ValueError, OSError, EOFError) as e:  # bad header, file shorter than it says
            raise ValueError(f"latent shard file {path} is truncated or corrupt ({e}); "
                             f"{redo}") from e
    latent = manifest.get("latent_shape")
    want = {"mean": (hi - lo, *latent) if latent else None, "label": (hi - lo,),
            "index": (hi - lo,)}
    want["std"] = want["mean"]
    dtypes = {"mean": manifest["dtype"], "std": manifest["dtype"], "label": "int32",
              "index": "int64"}
    for name, arr in out.items():
        bad_shape = (arr.shape != want[name] if want[name] is not None
                     else arr.ndim != 4 or arr.shape[0] != hi - lo)
        if bad_shape or arr.dtype != np.dtype(dtypes[name]):
            expected = want[name] or f"({hi - lo}, h, w, c)"
            raise ValueError(f"latent shard file {folder}/{name}.npy holds {arr.dtype} "
                             f"{arr.shape}, the manifest says {dtypes[name]} {expected}; {redo}")
    if out["std"].shape != out["mean"].shape:
        raise ValueError(f"{folder}: std {out['std'].shape} and mean {out['mean'].shape} "
                         f"differ; {redo}")
    if not np.array_equal(out["index"], np.arange(lo, hi)):
        raise ValueError(f"{folder}/index.npy does not hold the examples [{lo}, {hi}) of "
                         f"shard {k}; {redo}")
    return out


class LatentSource:
    """The data layer's Source API over a latent dataset (see the module docstring).

    get(indices) -> dict(image=float32 [n, h, w, c] = scale_factor * mean,
                         label=int32 [n]) (+ image_std = scale_factor * std when
    with_std, so a train step can draw z = image + image_std * eps on device).
    image_shape is the latent shape (h, w, c). Note: horizontal flips of latents are
    not flips of images; flip augmentation belongs before encoding.
    """

    def __init__(self, out_dir: str, with_std: bool = False):
        manifest = read_manifest(out_dir)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: not a latent dataset")
        check_format(manifest, out_dir)
        if not manifest.get("complete"):
            raise ValueError(f"the latent dataset in {out_dir} is incomplete: rerun the "
                             f"encoder with the same arguments to finish it:\n  "
                             f"{reencode_command(manifest, out_dir)}")
        self.out_dir = out_dir
        self.manifest = manifest
        self.with_std = with_std
        self.scale_factor = float(manifest["scale_factor"])
        self.shard_size = int(manifest["shard_size"])
        self._n = int(manifest["num_examples"])
        self._shards = [load_shard(out_dir, k, manifest)
                        for k in range(int(manifest["num_shards"]))]
        self.labels = np.concatenate([np.asarray(s["label"]) for s in self._shards])
        if len(self.labels) != self._n:
            raise ValueError(f"{out_dir}: shards hold {len(self.labels)} examples, the "
                             f"manifest says {self._n}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"LatentSource({self.out_dir!r}, n={self._n}, latent_shape="
                f"{self.image_shape}, scale_factor={self.scale_factor})")

    def get(self, indices: Any,
            image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        if image_size is not None and tuple(image_size) != self.image_shape[:2]:
            raise ValueError(f"latents are {self.image_shape[:2]}; they cannot be resized "
                             f"to {tuple(image_size)}")
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._n):
            raise IndexError(f"indices outside [0, {self._n}) of {self.out_dir}: "
                             f"[{indices.min()}, {indices.max()}]")
        keys = ("mean", "std") if self.with_std else ("mean",)
        out = {k: np.empty((len(indices), *self.image_shape), np.float32) for k in keys}
        shard_of, row = np.divmod(indices, self.shard_size)
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            for key in keys:
                out[key][sel] = self._shards[k][key][row[sel]]
        batch = {"image": out["mean"] * np.float32(self.scale_factor),
                 "label": self.labels[indices]}
        if self.with_std:
            batch["image_std"] = out["std"] * np.float32(self.scale_factor)
        return batch
