"""Prepares a tensorflow-datasets dataset in the array_record format that training reads.

    python -m diffusion.data.prepare --dataset cifar10 --data_dir ~/tensorflow_datasets

Preparing (download + encode) needs TensorFlow and the network:
    pip install tensorflow-cpu
Reading the result afterwards (`make_source("tfds:cifar10", data_dir=...)`) needs
neither. Some datasets (e.g. imagenet2012) need files downloaded by hand first; tfds
says which and where when it runs.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

from absl import app, flags

from diffusion import cli

TENSORFLOW_HINT = ("preparing a tfds dataset needs TensorFlow (pip install tensorflow-cpu) "
                   "and network access; reading it afterwards needs neither")

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("dataset", None, "tfds name, e.g. cifar10, mnist, celeb_a",
                    flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "where to put it (default: $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets)", flag_values=FLAGS)
flags.mark_flag_as_required("dataset", flag_values=FLAGS)


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


def main(argv: Sequence[str]) -> int:
    """argv as absl.app gives it (program name first); returns the exit status."""
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        path = prepare(FLAGS.dataset, FLAGS.data_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"prepared {FLAGS.dataset} at {path}; read it with "
          f"make_source('tfds:{FLAGS.dataset}', data_dir={FLAGS.data_dir!r})")
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
