"""Random-access image sources: the interface, in-memory arrays, IDX files, synthetic.

A source holds uint8 images and int32 labels and hands out any subset by index:

    len(source)                       number of examples N
    source.get(indices)               dict(image=uint8 [n, H, W, C], label=int32 [n])
    source.image_shape                (H, W, C); H, W may be None for variable-size data
    source.num_classes                K; 0 for unlabelled data (labels are then -1,
                                      the null class of the networks)
    source.conditioning(indices, epochs, seed)
                                      optional: more per-example inputs that may change
                                      per epoch, e.g. dict(tokens=int32 [n, 77]) of a
                                      CaptionedSource (diffusion.data.captioned)

Ordering, shuffling, batching and the [-1, 1] scaling are the BatchIterator's job.
"""

from __future__ import annotations

import zlib
from typing import Protocol, runtime_checkable

import numpy as np

from diffusion.data import idx
from diffusion.data.resize import as_size, crop_resize


@runtime_checkable
class Source(Protocol):
    """What BatchIterator needs from a dataset."""

    @property
    def image_shape(self) -> tuple[int | None, int | None, int]: ...

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray,
            image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]: ...


class ArraySource:
    """A dataset held in memory: batches are numpy fancy indexing, i.e. nearly free."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 class_names: tuple[str, ...] | None = None, name: str = "arrays"):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be uint8 [N, H, W, C], got "
                             f"{images.dtype} {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{name}: labels shape {labels.shape} does not match "
                             f"{images.shape[0]} images")
        if len(images) == 0:
            raise ValueError(f"{name}: the dataset is empty")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{name}: {len(class_names)} class names for "
                             f"{num_classes} classes")
        self.images = images
        self.labels = labels.astype(np.int32, copy=False)
        self._num_classes = int(num_classes)
        self.class_names = class_names
        self.name = name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"ArraySource({self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")

    def get(self, indices: np.ndarray,
            image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        images = self.images[indices]
        if image_size is not None:
            images = crop_resize(images, image_size)
        return dict(image=images, label=self.labels[indices])

    def resized(self, image_size: int | tuple[int, int]) -> "ArraySource":
        """The same data with every image cropped/resized once, up front."""
        size = as_size(image_size)
        if size == self.image_shape[:2]:
            return self
        return ArraySource(crop_resize(self.images, size), self.labels, self.num_classes,
                           self.class_names, f"{self.name}@{size[0]}x{size[1]}")


def idx_source(data_dir: str, split: str = "train", num_classes: int | None = None,
               class_names: tuple[str, ...] | None = None,
               fix_hint: str | None = None) -> ArraySource:
    """MNIST-format IDX files of `data_dir` (see `idx.load_idx_split`) in memory.

    num_classes defaults to max(label) + 1.
    """
    images, labels = idx.load_idx_split(data_dir, split, fix_hint=fix_hint)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{data_dir}: labels span [{labels.min()}, {labels.max()}], "
                         f"outside [0, {num_classes})")
    return ArraySource(images, labels, num_classes, class_names, name=f"idx:{data_dir}:{split}")


def fashion_mnist_source(split: str = "train", data_dir: str | None = None) -> ArraySource:
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` (or the same files elsewhere)."""
    data_dir = data_dir or idx.FASHION_MNIST_DIR
    hint = (f"{idx.FASHION_MNIST_APT} (installs the files into {idx.FASHION_MNIST_DIR})"
            if data_dir == idx.FASHION_MNIST_DIR else
            f"put the Fashion-MNIST IDX files there, or drop data_dir to use "
            f"{idx.FASHION_MNIST_DIR} after `{idx.FASHION_MNIST_APT}`")
    source = idx_source(data_dir, split, 10, idx.FASHION_MNIST_CLASSES, fix_hint=hint)
    source.name = f"fashion_mnist_idx:{split}"
    return source


def synthetic_source(image_shape: tuple[int, int, int] = (32, 32, 3),
                     num_examples: int = 512, num_classes: int = 10,
                     split: str = "train") -> ArraySource:
    """Deterministic labelled patterns, for tests and smoke runs.

    Example i has label i % K and shows oriented stripes whose angle and frequency
    depend on the label and whose phase depends on i (so examples differ), over a
    left-to-right ramp (so horizontal flips are visible). Each channel gets its own tint.
    The split only changes the phases.
    """
    h, w, c = image_shape
    if min(h, w, c, num_examples, num_classes) <= 0:
        raise ValueError(f"synthetic source needs positive sizes, got image_shape="
                         f"{image_shape}, num_examples={num_examples}, num_classes={num_classes}")
    labels = np.arange(num_examples, dtype=np.int32) % num_classes
    phase = np.random.default_rng(zlib.crc32(split.encode())).random(num_examples)
    theta = np.pi * labels / num_classes
    freq = 1.0 + labels % 3
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    proj = (np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (freq[:, None, None] * proj + phase[:, None, None]))
    tint = np.linspace(1.0, 0.6, c)
    pixels = 0.7 * stripes[..., None] * tint + 0.3 * xx[None, :, :, None]
    images = np.rint(255 * np.clip(pixels, 0, 1)).astype(np.uint8)
    return ArraySource(images, labels, num_classes, name=f"synthetic:{h}x{w}x{c}:{split}")
