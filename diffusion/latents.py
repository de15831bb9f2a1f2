"""Latent datasets for latent diffusion: encode a Source once with the VAE, train on it.

`encode_dataset` writes, into out_dir:
  latents-00000.npz, ...  shard k holds examples [k*shard_size, (k+1)*shard_size):
                          mean, std  float [n, h, w, c]  the VAE posterior q(z|x), unscaled
                          label      int32 [n]
                          index      int64 [n]          example indices (a check)
  manifest.json           sizes, shapes, classes, scale_factor, complete flag.
Storing the posterior's mean and std (not one sample) lets training redraw
z = mean + std * eps every epoch, or use the mean alone.

Every file is written to a temporary name and renamed into place (os.replace), so a
shard that exists is complete. A job that dies is rerun with the same arguments and
encodes only the shards that are missing.

`LatentSource(out_dir)` reads it back with numpy only (shards are memory-mapped) and
has the data layer's Source API, with float32 *scaled* latents (scale_factor * mean)
under 'image'.

CLI sketch:
  python -m diffusion.latents --vae PATH --source fashion_mnist_idx --image_size 32 --out DIR
PATH is a diffusers VAE (folder or weight file; its scaling_factor is kept) or the
workdir of a VAE trained here (train.objective "vae"; EMA params of its newest
checkpoint, scale factor measured from the data).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip member's local file header (30 bytes)


def shard_name(k: int) -> str:
    return f"latents-{k:05d}.npz"


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(out_dir: str, manifest: dict) -> None:
    _atomic_write(os.path.join(out_dir, MANIFEST),
                  lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def _read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def encode_dataset(source: Any, encode_fn: Callable[[np.ndarray], Any], out_dir: str,
                   shard_size: int = 4096, batch_size: int = 64, *,
                   scale_factor: float | None = None, image_size: tuple[int, int] | None = None,
                   dtype: str = "float32", info: dict | None = None,
                   log: Callable[[str], None] | None = print) -> dict:
    """Encode every example of `source` into shards under out_dir; returns the manifest.

    encode_fn: float32 images [b, H, W, C] in [-1, 1] -> (mean, logvar) [b, h, w, c]
      (e.g. a jitted `vae.apply(..., method='encode')`). It always gets exactly
      batch_size images (the last batch is padded), so it compiles once.
    scale_factor: stored for LatentSource; None estimates it from the data as
      1 / std(z), z ~ q(z|x) over the whole dataset (var = Var[mean] + E[std^2]).
    image_size: (H, W) passed to `source.get` to resize, e.g. to a multiple of the
      VAE's downsampling factor.
    dtype: storage dtype of mean/std ('float32' or 'float16').
    info: extra JSON-able facts recorded in the manifest (e.g. which VAE).
    Rerunning on the same out_dir resumes; a different dataset, shard layout or info
    there is an error (so shards of two VAEs are never mixed).
    """
    n = len(source)
    if n == 0:
        raise ValueError("the source is empty")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size}, "
                         f"{batch_size}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"unsupported storage dtype {dtype!r}: 'float32' or 'float16'")
    image_shape = tuple(source.image_shape)
    if image_size is not None:
        image_shape = (*image_size, image_shape[-1])
    if None in image_shape:
        raise ValueError(f"source images have variable size {image_shape}: pass image_size")
    num_shards = -(-n // shard_size)
    plan = {"format_version": FORMAT_VERSION, "num_examples": n, "shard_size": shard_size,
            "num_shards": num_shards, "image_shape": list(image_shape),
            "num_classes": int(source.num_classes), "dtype": dtype, "info": info or {}}
    os.makedirs(out_dir, exist_ok=True)
    old = _read_manifest(out_dir)
    if old is not None:
        diff = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{out_dir} holds a different latent dataset (manifest vs now: "
                             f"{diff}); use another out_dir or delete it")
        if old.get("complete") and (scale_factor is None or
                                    old.get("scale_factor") == scale_factor):
            return old
    _write_manifest(out_dir, dict(plan, complete=False))

    done = 0
    for k in range(num_shards):
        path = os.path.join(out_dir, shard_name(k))
        if os.path.exists(path):
            done += 1
            continue
        lo, hi = k * shard_size, min((k + 1) * shard_size, n)
        shard = _encode_range(source, encode_fn, lo, hi, batch_size, image_size, dtype)
        _atomic_write(path, lambda f: np.savez(f, **shard))
        if log:
            log(f"latents: wrote {shard_name(k)} ({k + 1}/{num_shards}, {hi}/{n} examples)")
    if log and done:
        log(f"latents: {done} of {num_shards} shards were already there, kept")

    latent_shape = list(_shard_arrays(os.path.join(out_dir, shard_name(0)))["mean"].shape[1:])
    if scale_factor is None:
        scale_factor = _estimate_scale(out_dir, num_shards)
    manifest = dict(plan, complete=True, latent_shape=latent_shape,
                    scale_factor=float(scale_factor))
    _write_manifest(out_dir, manifest)
    return manifest


def _encode_range(source, encode_fn, lo: int, hi: int, batch_size: int,
                  image_size, dtype: str) -> dict[str, np.ndarray]:
    means, stds, labels = [], [], []
    for start in range(lo, hi, batch_size):
        idx = np.arange(start, min(start + batch_size, hi))
        # Pad with the last index so every call has batch_size images (one compile).
        padded = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        data = source.get(padded, image_size) if image_size is not None else source.get(padded)
        images = np.asarray(data["image"])
        if images.dtype != np.uint8:
            raise ValueError(f"source images must be uint8, got {images.dtype}")
        x = images.astype(np.float32) / 127.5 - 1.0
        mean, logvar = encode_fn(x)
        mean = np.asarray(mean, np.float32)[:len(idx)]
        std = np.exp(0.5 * np.asarray(logvar, np.float32)[:len(idx)])
        means.append(mean.astype(dtype))
        stds.append(std.astype(dtype))
        label = data.get("label")
        labels.append(np.full(len(idx), -1, np.int32) if label is None
                      else np.asarray(label, np.int32)[:len(idx)])
    return {"mean": np.concatenate(means), "std": np.concatenate(stds),
            "label": np.concatenate(labels), "index": np.arange(lo, hi, dtype=np.int64)}


def _estimate_scale(out_dir: str, num_shards: int) -> float:
    # Var[z] for z = mean + std * eps is Var[mean] + E[std^2]: exact, no sampling.
    count, s1, s2, s_var = 0, 0.0, 0.0, 0.0
    for k in range(num_shards):
        arrays = _shard_arrays(os.path.join(out_dir, shard_name(k)))
        mean = np.asarray(arrays["mean"], np.float64)
        count += mean.size
        s1 += mean.sum()
        s2 += np.square(mean).sum()
        s_var += np.square(np.asarray(arrays["std"], np.float64)).sum()
    var = s2 / count - (s1 / count) ** 2 + s_var / count
    if not var > 0:
        raise ValueError(f"latents in {out_dir} have zero variance; cannot set a scale")
    return float(1.0 / np.sqrt(var))


def _shard_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz, memory-mapped where the member is stored uncompressed
    (np.savez), so reading a few rows does not read the whole shard."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                out[name] = np.load(path)[name]
                continue
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            name_len, extra_len = fields[-2], fields[-1]
            f.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: member {name} holds Python objects")
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype)
                continue
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                  order="F" if fortran else "C")
    return out


class LatentSource:
    """Source API over a latent dataset written by `encode_dataset`.

    get(indices) -> dict(image=float32 [n, h, w, c] = scale_factor * mean,
                         label=int32 [n]) (+ image_std = scale_factor * std when
    with_std, so a train step can draw z = image + image_std * eps on device).
    image_shape is the latent shape (h, w, c). Note: horizontal flips of latents are
    not flips of images; flip augmentation belongs before encoding.
    """

    def __init__(self, out_dir: str, with_std: bool = False):
        manifest = _read_manifest(out_dir)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: not a latent dataset")
        if not manifest.get("complete"):
            raise ValueError(f"the latent dataset in {out_dir} is incomplete: rerun "
                             "encode_dataset with the same arguments to finish it")
        self.out_dir = out_dir
        self.manifest = manifest
        self.with_std = with_std
        self.scale_factor = float(manifest["scale_factor"])
        self.shard_size = int(manifest["shard_size"])
        self._n = int(manifest["num_examples"])
        self._shards = [_shard_arrays(os.path.join(out_dir, shard_name(k)))
                        for k in range(manifest["num_shards"])]
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

    def get(self, indices: np.ndarray,
            image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        if image_size is not None and tuple(image_size) != self.image_shape[:2]:
            raise ValueError(f"latents are {self.image_shape[:2]}; they cannot be resized "
                             f"to {tuple(image_size)}")
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._n):
            raise IndexError(f"indices outside [0, {self._n})")
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


def main(argv: list[str] | None = None) -> None:
    """Encode a data-layer source with a diffusers-format VAE (see module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True, help="diffusers VAE folder or weight file, or "
                   "the workdir of a VAE trained with train.objective='vae'")
    p.add_argument("--source", required=True, help="data source name (diffusion.data)")
    p.add_argument("--split", default="train")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--shard_size", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--estimate_scale", action="store_true",
                   help="measure the scale factor from data instead of the VAE's own")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from diffusion.convert.diffusers_vae import load_sd_vae
    from diffusion.data import make_source

    source = make_source(args.source, args.split, args.data_dir)
    if os.path.isdir(os.path.join(args.vae, "checkpoints")):  # a training workdir
        from diffusion.train.latent_decoding import load_vae_workdir
        vae, params = load_vae_workdir(args.vae, jax.local_devices()[:1])
        vae_scale = None  # our VAEs carry no scale: measure 1 / std(z) on the data
    else:
        vae, params, vae_scale = load_sd_vae(args.vae)

    # Params are an argument, not closure constants baked into the program (an 84M-
    # parameter VAE as HLO constants compiles slowly).
    @jax.jit
    def encode(variables, x):
        if x.shape[-1] == 1 and vae.in_channels == 3:
            x = jnp.repeat(x, 3, axis=-1)  # grayscale data through an RGB VAE
        return vae.apply(variables, x, method="encode")
    encode_fn = lambda x: encode({"params": params}, x)

    size = (args.image_size, args.image_size) if args.image_size else None
    manifest = encode_dataset(source, encode_fn, args.out, args.shard_size, args.batch_size,
                              scale_factor=None if args.estimate_scale else vae_scale,
                              image_size=size, dtype=args.dtype,
                              info={"vae": os.path.abspath(args.vae), "source": args.source,
                                    "split": args.split})
    print(json.dumps({k: manifest[k] for k in ("num_examples", "latent_shape",
                                               "scale_factor")}))


if __name__ == "__main__":
    main()
