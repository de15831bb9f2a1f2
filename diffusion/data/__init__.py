"""Data: random-access image sources and a deterministic, resumable batch iterator.

    source = make_source("fashion_mnist_idx")            # or "tfds:cifar10", "synthetic:32x32x3"
    batches = BatchIterator(source, global_batch_size=128, seed=0, random_flip=True,
                            start_step=restored_step)    # resume from a checkpoint
    batch = next(batches)    # dict(image=float32 [B, H, W, C] in [-1, 1], label=int32 [B])

The tfds adapter (`TfdsSource`) is imported lazily, so this package does not import
tensorflow_datasets unless a tfds source is asked for.
"""

from diffusion.data.idx import (FASHION_MNIST_APT, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR,
                                load_idx_split, read_idx, write_idx)
from diffusion.data.iterator import BatchIterator
from diffusion.data.registry import KNOWN_SOURCES, make_source
from diffusion.data.resize import crop_resize
from diffusion.data.sources import (ArraySource, Source, fashion_mnist_source, idx_source,
                                    synthetic_source)

__all__ = [
    "ArraySource", "BatchIterator", "FASHION_MNIST_APT", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR", "KNOWN_SOURCES", "Source", "TfdsSource", "crop_resize",
    "fashion_mnist_source", "idx_source", "load_idx_split", "make_source", "read_idx",
    "synthetic_source", "write_idx",
]


def __getattr__(name: str):
    if name == "TfdsSource":
        # Lazy: tensorflow-datasets takes ~0.5 s to import and most runs never use it.
        from diffusion.data.tfds_source import TfdsSource
        return TfdsSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
