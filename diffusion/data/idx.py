"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the array in C order,
big-endian. Files may be gzipped; we tell by the gzip magic bytes, not the name.

Offline, Debian's `dataset-fashion-mnist` package ships the complete Fashion-MNIST
under `FASHION_MNIST_DIR`.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "sudo apt-get install dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# IDX dtype code -> big-endian numpy dtype.
_CODE_TO_DTYPE = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_TO_CODE = {(d.kind, d.itemsize): c for c, d in _CODE_TO_DTYPE.items()}

# File stems per split; the usual names, plus the dotted variant some mirrors use.
_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (gzipped or raw) into a native-endian numpy array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        # zlib with wbits=31 reads the gzip container and is faster than the gzip module.
        raw = zlib.decompress(raw, 31)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _CODE_TO_DTYPE:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    dtype = _CODE_TO_DTYPE[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
            f"holds {len(raw)} bytes (truncated or corrupt)")
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes `array` as an IDX file; gzipped when the path ends in `.gz`."""
    array = np.asarray(array)
    code = _KIND_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, _CODE_TO_DTYPE[code]).tobytes()
    if os.fspath(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=1)
    with open(path, "wb") as f:
        f.write(payload)


def idx_file_names(split: str) -> tuple[str, str]:
    """The (images, labels) base names for a split, without a `.gz` suffix."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(
            f"unknown IDX split {split!r}; known splits: {sorted(_SPLIT_PREFIX)}")
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find(data_dir: str, base: str) -> str | None:
    dotted = base.replace("-idx", ".idx", 1)
    for name in (base + ".gz", base, dotted + ".gz", dotted):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def load_idx_split(data_dir: str, split: str = "train",
                   fix_hint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads a split of an MNIST-format directory.

    Returns images uint8 [N, H, W, 1] and labels int32 [N]. `fix_hint` is added to the
    error when files are missing (e.g. the apt command that installs them).
    """
    image_base, label_base = idx_file_names(split)
    paths = {base: _find(data_dir, base) for base in (image_base, label_base)}
    missing = [base + "[.gz]" for base, path in paths.items() if path is None]
    if missing:
        where = ("directory does not exist" if not os.path.isdir(data_dir)
                 else "missing " + ", ".join(missing))
        msg = f"MNIST-format IDX files for split {split!r} not found in {data_dir} ({where})."
        if fix_hint:
            msg += f" Fix: {fix_hint}"
        raise FileNotFoundError(msg)
    images = read_idx(paths[image_base])
    labels = read_idx(paths[label_base])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{paths[image_base]}: expected uint8 [N, H, W] images, got "
                         f"{images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{paths[label_base]}: {labels.shape[0] if labels.ndim else 0} "
                         f"labels for {images.shape[0]} images")
    return images[..., None], labels.astype(np.int32)
