"""Encode a dataset once with a VAE into latent shards, for latent diffusion.

    python -m diffusion.autoencoder.encode --vae=PATH --source=fashion_mnist_idx \\
        --image_size=32 --out=DIR [--split=train] [--shard_size=4096] [--estimate_scale]

PATH is the workdir of a VAE trained here (train.objective "vae": the EMA params of its
newest checkpoint, loaded by diffusion.pretrained.load_vae; the scale factor is measured
from the data) or a diffusers-format VAE (folder or weight file; its scaling_factor is
kept unless --estimate_scale). The folder's format (one memory-mappable `.npy` file per
array and shard, and manifest.json) is diffusion.data.latents', whose LatentSource reads
it: train on it with `--config.data.source=latents:DIR`.

Each shard stores the posterior's mean and std, not one sample of it, so training can
redraw z = mean + std * eps every epoch or use the mean alone. A shard is written to a
temporary folder and renamed into place, so a shard that exists is complete: a job that
dies is rerun with the same arguments and encodes only the shards that are missing.
Prints one JSON line: num_examples, latent_shape, scale_factor.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from diffusion import cli, pretrained
from diffusion.data import make_source
from diffusion.data.latents import (ARRAYS, FORMAT_VERSION, MANIFEST, load_shard,
                                    read_manifest, shard_dir, shard_rows)

FLAGS = flags.FlagValues()
flags.DEFINE_string("vae", None, "Workdir of a VAE trained with train.objective='vae', or a "
                    "diffusers VAE folder or weight file.", flag_values=FLAGS)
flags.DEFINE_string("source", None, "Data source name (diffusion.data.make_source).",
                    flag_values=FLAGS)
flags.DEFINE_string("split", "train", "Split of the source.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "data_dir of the source, where it needs one.",
                    flag_values=FLAGS)
flags.DEFINE_integer("image_size", 0, "Resize images to this square size first (a "
                     "multiple of the VAE's downsampling factor); 0 = their own.",
                     flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output folder of the latent dataset.", flag_values=FLAGS)
flags.DEFINE_integer("shard_size", 4096, "Examples per shard.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per encoder call.", flag_values=FLAGS)
flags.DEFINE_bool("estimate_scale", False, "Measure the scale factor from the data "
                  "instead of a diffusers VAE's own.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Storage dtype of mean/std.",
                  flag_values=FLAGS)
flags.mark_flags_as_required(["vae", "source", "out"], flag_values=FLAGS)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(out_dir: str, manifest: dict) -> None:
    _atomic_write(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())


def _write_shard(out_dir: str, k: int, arrays: dict[str, np.ndarray]) -> None:
    """Writes shard k's .npy files into a temporary folder, then renames it into place."""
    final = os.path.join(out_dir, shard_dir(k))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a job that died while writing it
    os.makedirs(tmp)
    for name in ARRAYS:
        with open(os.path.join(tmp, f"{name}.npy"), "wb") as f:
            np.save(f, arrays[name], allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, final)


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
    Rerunning on the same out_dir resumes; a different dataset, shard layout, format or
    info there is an error (so shards of two VAEs are never mixed).
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
    old = read_manifest(out_dir)
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
        if os.path.isdir(os.path.join(out_dir, shard_dir(k))):
            done += 1
            continue
        lo, hi = shard_rows(plan, k)
        _write_shard(out_dir, k, _encode_range(source, encode_fn, lo, hi, batch_size,
                                               image_size, dtype))
        if log:
            log(f"latents: wrote {shard_dir(k)} ({k + 1}/{num_shards}, {hi}/{n} examples)")
    if log and done:
        log(f"latents: {done} of {num_shards} shards were already there, kept")

    shards = [load_shard(out_dir, k, plan) for k in range(num_shards)]
    latent_shape = list(shards[0]["mean"].shape[1:])
    for k, shard in enumerate(shards):
        if list(shard["mean"].shape[1:]) != latent_shape:
            raise ValueError(f"{shard_dir(k)} holds latents {shard['mean'].shape[1:]}, shard 0 "
                             f"{tuple(latent_shape)}: encoded with another VAE or size?")
    if scale_factor is None:
        scale_factor = _estimate_scale(shards, out_dir)
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


def _estimate_scale(shards: list[dict[str, np.ndarray]], out_dir: str) -> float:
    # Var[z] for z = mean + std * eps is Var[mean] + E[std^2]: exact, no sampling.
    count, s1, s2, s_var = 0, 0.0, 0.0, 0.0
    for arrays in shards:
        mean = np.asarray(arrays["mean"], np.float64)
        count += mean.size
        s1 += mean.sum()
        s2 += np.square(mean).sum()
        s_var += np.square(np.asarray(arrays["std"], np.float64)).sum()
    var = s2 / count - (s1 / count) ** 2 + s_var / count
    if not var > 0:
        raise ValueError(f"latents in {out_dir} have zero variance; cannot set a scale")
    return float(1.0 / np.sqrt(var))


def main(argv: Sequence[str]) -> dict:
    """Encodes the flags' source with the flags' VAE; returns (and prints) the summary."""
    cli.parse(FLAGS, argv)
    source = make_source(FLAGS.source, FLAGS.split, FLAGS.data_dir)
    vae, params, vae_scale = pretrained.load_vae(FLAGS.vae, devices=jax.local_devices()[:1])

    # Params are an argument, not closure constants baked into the program (an 84M-
    # parameter VAE as HLO constants compiles slowly).
    @jax.jit
    def encode(variables, x):
        if x.shape[-1] == 1 and vae.in_channels == 3:
            x = jnp.repeat(x, 3, axis=-1)  # grayscale data through an RGB VAE
        return vae.apply(variables, x, method="encode")

    size = (FLAGS.image_size,) * 2 if FLAGS.image_size else None
    manifest = encode_dataset(
        source, lambda x: encode({"params": params}, x), FLAGS.out, FLAGS.shard_size,
        FLAGS.batch_size, scale_factor=None if FLAGS.estimate_scale else vae_scale,
        image_size=size, dtype=FLAGS.dtype,
        info={"vae": os.path.abspath(FLAGS.vae), "source": FLAGS.source,
              "split": FLAGS.split, **({"data_dir": FLAGS.data_dir} if FLAGS.data_dir else {})})
    summary = {k: manifest[k] for k in ("num_examples", "latent_shape", "scale_factor")}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    cli.run(main, FLAGS)
