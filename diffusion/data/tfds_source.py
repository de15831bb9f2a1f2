"""A Source over a prepared tensorflow-datasets dataset, read without TensorFlow.

`tfds.data_source` gives random access to datasets prepared in the array_record format;
records are decoded with numpy/PIL, so reading needs neither TensorFlow nor the network.
Preparing a dataset does need both: see `python -m diffusion.data.prepare --help`.
"""

from __future__ import annotations

import os
import shlex
import sys

import numpy as np

from diffusion.data.resize import crop_resize


def default_data_dir() -> str:
    """Where tfds looks when no data_dir is given ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares `name` in the format this module reads."""
    return (f"{shlex.quote(sys.executable)} -m diffusion.data.prepare --dataset {shlex.quote(name)}"
            f" --data_dir {shlex.quote(data_dir or default_data_dir())}")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("reading tfds datasets needs tensorflow-datasets and array-record: "
                          "pip install tensorflow-datasets array-record") from e
    return tfds


class TfdsSource:
    """Random access to one split of a prepared tfds dataset.

    Images come from `image_key` (uint8 HWC); labels from `label_key` when the dataset
    has it (a ClassLabel), else every label is -1 (null class) and num_classes is 0.

    cache_decoded: keep every decoded image in memory once read, so that epochs after
    the first skip the read and the decode (PNG/JPEG decoding through tfds costs about
    0.3-1 ms per 32x32 image, far more than the train step of a small model needs).
    "auto" caches fixed-size datasets of at most CACHE_MAX_BYTES decoded (CIFAR-10:
    150 MB), True any fixed-size one, False none. Memory is taken as examples arrive.
    """

    # Reading and decoding are per example and thread-safe (array_record shares one
    # thread-safe reader per shard; PIL releases the GIL while it decodes), so
    # BatchIterator reads chunks of a batch on a thread pool.
    parallel_reads = True

    CACHE_MAX_BYTES = 2 ** 30

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label",
                 cache_decoded: bool | str = "auto"):
        tfds = _import_tfds()
        fix = prepare_command(name, data_dir)
        needs = "(preparing needs TensorFlow and the network: pip install tensorflow-cpu)"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(
                f"tensorflow-datasets has no dataset {name!r} and none is prepared under "
                f"{data_dir or default_data_dir()}; check the name against "
                f"https://www.tensorflow.org/datasets/catalog") from e
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared under {data_dir or default_data_dir()} "
                f"(looked for {builder.data_dir}). Prepare it once with: {fix}  {needs}")
        try:
            self._records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except NotImplementedError as e:
            # Prepared, but in the default TFRecord format, which has no random access.
            raise ValueError(
                f"tfds dataset {name!r} at {builder.data_dir} is not in array_record format; "
                f"prepare it into another data_dir with: {fix}  {needs}") from e
        except ValueError as e:
            raise ValueError(f"tfds dataset {name!r}: {e}") from e
        features = builder.info.features
        if image_key not in features:
            raise ValueError(f"tfds dataset {name!r} has no {image_key!r} feature; "
                             f"features: {sorted(features.keys())}")
        self._image_shape = tuple(features[image_key].shape)
        if len(self._image_shape) != 3:
            raise ValueError(f"tfds dataset {name!r}: {image_key!r} has shape "
                             f"{self._image_shape}, expected (H, W, C)")
        self._has_label = label_key in features
        self._num_classes = int(features[label_key].num_classes) if self._has_label else 0
        self.class_names = tuple(features[label_key].names) if self._has_label else None
        self.image_key, self.label_key = image_key, label_key
        self.name = f"tfds:{name}:{split}"
        self._cache = self._labels = self._cached = None
        if cache_decoded not in ("auto", True, False):
            raise ValueError(f"cache_decoded must be 'auto', True or False, got "
                             f"{cache_decoded!r}")
        fixed = None not in self._image_shape
        size = len(self._records) * int(np.prod(self._image_shape)) if fixed else 0
        if fixed and (cache_decoded is True or
                      (cache_decoded == "auto" and size <= self.CACHE_MAX_BYTES)):
            # np.zeros maps untouched pages lazily: memory grows as examples are read.
            self._cache = np.zeros((len(self._records),) + self._image_shape, np.uint8)
            self._labels = np.zeros(len(self._records), np.int32)
            self._cached = np.zeros(len(self._records), bool)

    @property
    def image_shape(self) -> tuple[int | None, int | None, int]:
        return self._image_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"TfdsSource({self.name!r}, n={len(self)}, image_shape={self.image_shape}, "
                f"num_classes={self.num_classes})")

    @property
    def cached_fraction(self) -> float:
        """Share of the examples held decoded in memory (0 without a cache)."""
        return 0.0 if self._cached is None else float(self._cached.mean())

    def get(self, indices: np.ndarray,
            image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        if self._cache is None:
            return self._read(indices, image_size)
        indices = np.asarray(indices, np.int64).reshape(-1)
        missing = np.unique(indices[~self._cached[indices]])
        if len(missing):
            # Concurrent callers (BatchIterator's threads) may decode the same example
            # twice; they write identical bytes, and the flag is set after the data.
            got = self._read(missing, None)
            self._cache[missing] = got["image"]
            self._labels[missing] = got["label"]
            self._cached[missing] = True
        images = self._cache[indices]
        return dict(image=images if image_size is None else crop_resize(images, image_size),
                    label=self._labels[indices])

    def _read(self, indices: np.ndarray,
              image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        keys = [int(i) for i in np.asarray(indices).reshape(-1)]
        if hasattr(self._records, "__getitems__"):
            records = self._records.__getitems__(keys)  # one batched array_record read
        else:
            records = [self._records[i] for i in keys]
        images = [np.asarray(r[self.image_key], np.uint8) for r in records]
        labels = (np.asarray([r[self.label_key] for r in records], np.int32) if self._has_label
                  else np.full(len(records), -1, np.int32))
        if not images:
            h, w = image_size or (d or 0 for d in self._image_shape[:2])
            return dict(image=np.zeros((0, h, w, self._image_shape[2]), np.uint8), label=labels)
        if len({im.shape for im in images}) == 1:
            batch = np.stack(images)
            return dict(image=batch if image_size is None else crop_resize(batch, image_size),
                        label=labels)
        if image_size is None:
            raise ValueError(f"{self.name} has images of different sizes; pass image_size")
        return dict(image=np.stack([crop_resize(im[None], image_size)[0] for im in images]),
                    label=labels)
