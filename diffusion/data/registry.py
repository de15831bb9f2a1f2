"""`make_source(name, split, data_dir)`: dataset names used in configs -> Sources.

Names:
  fashion_mnist_idx        Fashion-MNIST, offline, from Debian's dataset-fashion-mnist
                           (data_dir defaults to /usr/share/datasets/fashion-mnist)
  fashion_mnist_captions   the same with a caption per example and epoch: batches carry
                           tokens int32 [B, 77] (diffusion.data.captioned); option
                           vocab_dir= for CLIP tokenizer files instead of the demo's
  idx                      any directory of MNIST-format IDX files (data_dir required)
  synthetic[:HxWxC[:N]]    deterministic labelled patterns (default 32x32x3, N=512);
                           options num_examples=, num_classes=
  tfds:<name>              a tensorflow-datasets dataset prepared in array_record format,
                           e.g. tfds:cifar10, tfds:mnist, tfds:celeb_a
  latents:<dir>            VAE latents written by `python -m diffusion.autoencoder.encode`
                           (a diffusion.data.latents.LatentSource: float32 scaled latents;
                           one split per directory, so `split` and `data_dir` are unused)
  pairs:<file.npy>         (sample, noise) pairs of a flow model for reflow, written by
                           `python -m diffusion.reflow_pairs` (diffusion.data.pairs);
                           batches carry noise float32 [B, H, W, C] beside the images
"""

from __future__ import annotations

import re
from typing import Any

from diffusion.data.captioned import fashion_mnist_captions_source
from diffusion.data.latents import LatentSource
from diffusion.data.pairs import PairSource
from diffusion.data.sources import Source, fashion_mnist_source, idx_source, synthetic_source

KNOWN_SOURCES = ("fashion_mnist_idx", "fashion_mnist_captions", "idx",
                 "synthetic[:HxWxC[:N]]", "tfds:<name>", "latents:<dir>", "pairs:<file.npy>")

_SYNTHETIC = re.compile(r"synthetic(?::(\d+)x(\d+)x(\d+)(?::(\d+))?)?")


def make_source(name: str, split: str = "train", data_dir: str | None = None,
                **options: Any) -> Source:
    """Builds the Source called `name` (see the module docstring for the names).

    `options` go to the source's constructor (e.g. num_classes=4 for synthetic,
    label_key=... for tfds).
    """
    if name == "fashion_mnist_idx":
        return fashion_mnist_source(split, data_dir, **options)
    if name == "fashion_mnist_captions":
        return fashion_mnist_captions_source(split, data_dir, **options)
    if name == "idx":
        if not data_dir:
            raise ValueError("source 'idx' needs data_dir: a directory holding "
                             "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], ...")
        return idx_source(data_dir, split, **options)
    match = _SYNTHETIC.fullmatch(name)
    if match:
        h, w, c, n = match.groups()
        if h is not None:
            options.setdefault("image_shape", (int(h), int(w), int(c)))
        if n is not None:
            options.setdefault("num_examples", int(n))
        return synthetic_source(split=split, **options)
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        from diffusion.data.tfds_source import TfdsSource  # tfds imports take ~0.5 s
        return TfdsSource(name[len("tfds:"):], split, data_dir, **options)
    if name.startswith("latents:") and len(name) > len("latents:"):
        return LatentSource(name[len("latents:"):], **options)
    if name.startswith("pairs:") and len(name) > len("pairs:"):
        return PairSource(name[len("pairs:"):], **options)
    raise ValueError(f"unknown data source {name!r}; known: {', '.join(KNOWN_SOURCES)}")
