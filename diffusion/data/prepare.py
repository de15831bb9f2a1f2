"""Prepares a tensorflow-datasets dataset in the array_record format that training reads.

    python -m diffusion.data.prepare --dataset cifar10 --data_dir ~/tensorflow_datasets

Preparing (download + encode) needs TensorFlow and the network:
    pip install tensorflow-cpu
Reading the result afterwards (`make_source("tfds:cifar10", data_dir=...)`) needs
neither. Some datasets (e.g. imagenet2012) need files downloaded by hand first; tfds
says which and where when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

TENSORFLOW_HINT = ("preparing a tfds dataset needs TensorFlow (pip install tensorflow-cpu) "
                   "and network access; reading it afterwards needs neither")


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def prepare(name: str, data_dir: str | None = None) -> str:
    """Downloads and prepares `name` as array_record; returns the dataset directory."""
    if not _tensorflow_available():
        raise RuntimeError(f"TensorFlow is not installed: {TENSORFLOW_HINT}")
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.data.prepare",
        description=f"Prepare a tfds dataset as array_record. Note: {TENSORFLOW_HINT}.")
    parser.add_argument("--dataset", required=True, help="tfds name, e.g. cifar10, mnist, celeb_a")
    parser.add_argument("--data_dir", default=None,
                        help="where to put it (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    try:
        path = prepare(args.dataset, args.data_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"prepared {args.dataset} at {path}; read it with "
          f"make_source('tfds:{args.dataset}', data_dir={args.data_dir!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
