"""(sample, noise) pairs of a trained flow model, for rectified-flow reflow.

On disk, one `.npy` file of float32 [N, 2, H, W, C]: pair i is (x0_i, eps_i), x0 the
sample the model's ODE sampler reached from the noise eps (the start state x_1 = eps
of the flow path). A class-conditional model's labels sit beside it in
`NAME.labels.npy` (int32 [N]). `python -m diffusion.reflow_pairs` writes both through
`PairWriter`: into temporary names, renamed into place when every row is written, so a
pairs file that exists is complete.

`PairSource` (data source `pairs:FILE.npy`) reads the file memory-mapped: its `get`
gives image = x0 (float32: the BatchIterator passes it through unscaled and never
flips it) and label, and its `conditioning` hook gives noise = eps for the same indices.
The iterator adds the hook's arrays to each batch, so the pairs are shuffled, split over
processes and resumed exactly like images: a batch is a function of (seed, step).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

WRITE_COMMAND = "python -m diffusion.reflow_pairs --workdir RUN --out FILE.npy"


def labels_path(path: str) -> str:
    """NAME.labels.npy beside NAME.npy."""
    return (path[:-4] if path.endswith(".npy") else path) + ".labels.npy"


def _tmp(path: str) -> str:
    return path + ".tmp.npy"


class PairWriter:
    """Writes N pairs of shape (H, W, C) row block by row block; `close()` renames the
    finished files into place (nothing appears at `path` before that)."""

    def __init__(self, path: str, num: int, image_shape: tuple, with_labels: bool):
        if not path.endswith(".npy"):
            raise ValueError(f"a pairs file is a .npy file, got {path!r}")
        if num < 1:
            raise ValueError(f"need at least one pair, got num={num}")
        self.path, self.num = path, int(num)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._pairs = np.lib.format.open_memmap(
            _tmp(path), mode="w+", dtype=np.float32, shape=(self.num, 2, *image_shape))
        self._labels = (np.lib.format.open_memmap(
            _tmp(labels_path(path)), mode="w+", dtype=np.int32, shape=(self.num,))
            if with_labels else None)

    def write(self, start: int, x0: np.ndarray, eps: np.ndarray,
              labels: Optional[np.ndarray] = None) -> None:
        """Rows [start, start + len(x0))."""
        n = len(x0)
        if eps.shape != x0.shape or start < 0 or start + n > self.num:
            raise ValueError(f"pairs rows [{start}, {start + n}) of {self.num}: x0 "
                             f"{x0.shape} and eps {eps.shape} must match and fit")
        self._pairs[start:start + n, 0] = x0
        self._pairs[start:start + n, 1] = eps
        if self._labels is not None:
            self._labels[start:start + n] = labels

    def close(self) -> str:
        self._pairs.flush()
        del self._pairs
        if self._labels is not None:
            self._labels.flush()
            del self._labels
            os.replace(_tmp(labels_path(self.path)), labels_path(self.path))
        elif os.path.exists(labels_path(self.path)):
            os.remove(labels_path(self.path))  # a stale one from an earlier, labelled run
        os.replace(_tmp(self.path), self.path)
        return self.path


def write_pairs(path: str, x0: np.ndarray, eps: np.ndarray,
                labels: Optional[np.ndarray] = None) -> str:
    """All pairs at once: x0, eps float [N, H, W, C], labels int [N] or None."""
    writer = PairWriter(path, len(x0), x0.shape[1:], labels is not None)
    writer.write(0, x0, eps, labels)
    return writer.close()


class PairSource:
    """The data layer's Source API over a pairs file (see the module docstring)."""

    def __init__(self, path: str):
        redo = f"write it again with `{WRITE_COMMAND}`"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no pairs file {path}; {redo}")
        try:
            pairs = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # bad header, shorter than it says
            raise ValueError(f"pairs file {path} is truncated or corrupt ({e}); {redo}") from e
        if pairs.ndim != 5 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype,
                                                                       np.floating):
            raise ValueError(f"pairs file {path} holds {pairs.dtype} {pairs.shape}, not float "
                             f"[N, 2, H, W, C] (sample, noise) pairs; {redo}")
        if len(pairs) == 0:
            raise ValueError(f"pairs file {path} is empty; {redo}")
        self.path, self.pairs = path, pairs
        self.labels = np.full(len(pairs), -1, np.int32)
        self._num_classes = 0
        if os.path.exists(labels_path(path)):
            labels = np.load(labels_path(path), allow_pickle=False)
            if labels.shape != (len(pairs),):
                raise ValueError(f"{labels_path(path)} holds {labels.shape} labels for "
                                 f"{len(pairs)} pairs; {redo}")
            self.labels = labels.astype(np.int32)
            self._num_classes = int(labels.max()) + 1

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.pairs.shape[2:])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        return f"PairSource({self.path!r}, n={len(self)}, image_shape={self.image_shape})"

    def _rows(self, indices: Any, which: int) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)}) of {self.path}: "
                             f"[{indices.min()}, {indices.max()}]")
        # Sorted reads touch the memory map in order; then back to the asked order.
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), *self.image_shape), np.float32)
        out[order] = self.pairs[indices[order], which]
        return out

    def get(self, indices: Any,
            image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """dict(image=x0 float32 [n, H, W, C], label=int32 [n])."""
        if image_size is not None and tuple(image_size) != self.image_shape[:2]:
            raise ValueError(f"reflow pairs are {self.image_shape[:2]}; they cannot be "
                             f"resized to {tuple(image_size)}")
        indices = np.asarray(indices, np.int64)
        return dict(image=self._rows(indices, 0), label=self.labels[indices])

    def conditioning(self, indices: Any, epochs: Any, seed: int) -> dict[str, np.ndarray]:
        """dict(noise=eps float32 [n, H, W, C]): the noise each image came from (the
        same in every epoch and for every seed)."""
        return dict(noise=self._rows(indices, 1))
