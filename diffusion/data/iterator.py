"""Deterministic, resumable, multi-host batches from a Source.

The data order is a pure function of (seed, step):
  * epoch e visits the examples in the order perm_e = default_rng([seed, 0, e]).permutation(N)
    (the identity when shuffle=False);
  * the epochs are concatenated into one stream, and global batch k is stream positions
    [k*B, (k+1)*B), so a batch may straddle two epochs and every example is seen exactly
    once per epoch;
  * the horizontal flips of batch k come from default_rng([seed, 1, k]), one draw per
    global batch position;
  * a source with a `conditioning(indices, epochs, seed)` method (captions) adds its
    arrays to each batch, e.g. tokens int32 [B_local, 77], a function of each example's
    index and epoch and the seed, so they resume and split over processes as the images.
Hence resuming is `start_step=k` (checkpoint `.step`), and with several processes each
takes its contiguous slice [p*B/P, (p+1)*B/P) of the same global batch.
Float sources (a LatentSource of VAE latents) are passed through as float32, unscaled
and never flipped: a mirrored latent is not the latent of the mirrored image.

Sources that decode per example (TfdsSource: PNG/JPEG) declare `parallel_reads = True`;
their batches are then cut into contiguous chunks that a thread pool of
`decode_workers` threads reads, decodes, crops, flips and scales into one preallocated
array (PIL's decoders, array_record's reads and numpy's bulk ops release the GIL, so
this scales with cores). Chunk j always holds the same positions of the batch, so the
batches are identical for any number of workers.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import weakref
from typing import Iterator

import numpy as np

from diffusion.data.resize import as_size
from diffusion.data.sources import ArraySource, Source
from diffusion.data.latents import LatentSource

# Fewer examples than this per chunk cost more in thread hand-off than they save.
_MIN_CHUNK = 16
_SCALE = np.float32(1.0 / 127.5)


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class BatchIterator:
    """Yields dict(image=float32 [B_local, H, W, C] in [-1, 1], label=int32 [B_local]),
    plus the source's conditioning arrays if it has any (tokens=int32 [B_local, L]).

    uint8 sources are mapped to [-1, 1]; float sources (latents) pass through unchanged.

    global_batch_size: B, summed over processes; must be divisible by process_count.
    image_size: int or (H, W); images are center-cropped/resized bilinearly to it
      (in-memory sources once up front, others per batch).
    num_epochs: None streams forever. Otherwise the stream ends after that many epochs;
      its last partial batch is dropped when drop_remainder, else yielded short (and
      then possibly empty on some processes).
    prefetch: batches computed ahead on a background thread (0: none). The batches are
      the same either way, since each is a function of its step only.
    decode_workers: threads that read and decode one batch of a source with
      `parallel_reads` (tfds): -1 = one per available core, 0 = the calling thread.
      Ignored for in-memory sources. The batches are the same for any value.
    """

    def __init__(self, source: Source, global_batch_size: int, seed: int, *,
                 shuffle: bool = True, random_flip: bool = False,
                 image_size: int | tuple[int, int] | None = None,
                 drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1, start_step: int = 0,
                 num_epochs: int | None = None, prefetch: int = 0,
                 decode_workers: int = -1):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                             f"the process count {process_count}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        if len(source) == 0:
            raise ValueError(f"{source!r} is empty")
        if decode_workers < -1:
            raise ValueError(f"decode_workers must be -1 (auto), 0 or positive, got "
                             f"{decode_workers}")
        if random_flip and isinstance(source, LatentSource):
            raise ValueError(f"random_flip with the latent dataset {source!r}: flipping a "
                             "latent does not flip its image; set data.random_flip=False "
                             "(flip images before encoding instead)")

        h, w, _ = source.image_shape
        self._image_size = None
        if image_size is not None:
            size = as_size(image_size)
            if size != (h, w):
                if isinstance(source, ArraySource):
                    source = source.resized(size)  # once, so batches stay cheap
                else:
                    self._image_size = size  # resized per batch by the source
        elif h is None or w is None:
            raise ValueError(f"{source!r} has images of varying size; pass image_size")

        self.source = source
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.process_index = process_index
        self.process_count = process_count
        self.num_examples = len(source)
        self.num_epochs = num_epochs
        self._drop_remainder = drop_remainder
        self._start_step = int(start_step)
        self._step = int(start_step)
        self._perm_cache: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()  # batch_at may run on the prefetch thread
        self._prefetch = int(prefetch)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not getattr(source, "parallel_reads", False):
            decode_workers = 0
        self.decode_workers = _available_cores() if decode_workers == -1 else decode_workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- pure functions of (seed, step) ------------------------------------------------

    @property
    def num_batches(self) -> int | None:
        """Batches in the whole stream (counting from step 0); None when endless."""
        if self.num_epochs is None:
            return None
        total = self.num_epochs * self.num_examples
        b = self.global_batch_size
        return total // b if self._drop_remainder else -(-total // b)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The order of example indices in `epoch`, int64 [N]."""
        with self._perm_lock:
            perm = self._perm_cache.get(epoch)
            if perm is None:
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, 0, epoch])
                    perm = rng.permutation(self.num_examples)
                else:
                    perm = np.arange(self.num_examples)
                if len(self._perm_cache) >= 4:  # a batch spans few epochs: keep it small
                    self._perm_cache.pop(next(iter(self._perm_cache)))
                self._perm_cache[epoch] = perm
        return perm

    def _positions(self, step: int) -> np.ndarray:
        """Stream positions of this process's part of global batch `step`, int64."""
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        stop = start + self.local_batch_size
        if self.num_epochs is not None:
            stop = min(stop, self.num_epochs * self.num_examples)
        return np.arange(start, max(start, stop))

    def epochs_at(self, step: int) -> np.ndarray:
        """The epoch of each example of this process's part of batch `step`, int64."""
        return self._positions(step) // self.num_examples

    def indices_at(self, step: int) -> np.ndarray:
        """Example indices of this process's part of global batch `step`, int64 [B_local]."""
        pos = self._positions(step)
        epochs, offsets = np.divmod(pos, self.num_examples)
        out = np.empty(len(pos), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch_permutation(int(e))[offsets[sel]]
        return out

    def flips_at(self, step: int) -> np.ndarray:
        """bool [B_local]: which images of this process's part of batch `step` are flipped."""
        flips = np.random.default_rng([self.seed, 1, step]).random(self.global_batch_size) < 0.5
        lo = self.process_index * self.local_batch_size
        return flips[lo:lo + self.local_batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of global batch `step`."""
        indices = self.indices_at(step)
        batch = self._images_at(step, indices)
        conditioning = getattr(self.source, "conditioning", None)
        if conditioning is not None:
            batch.update(conditioning(indices, self.epochs_at(step), self.seed))
        return batch

    def _images_at(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        flips = self.flips_at(step)[:len(indices)] if self.random_flip else None
        chunks = min(self.decode_workers, len(indices) // _MIN_CHUNK)
        if chunks < 2:
            return self._load(indices, flips)
        h, w = self._image_size or self.source.image_shape[:2]
        out = dict(image=np.empty((len(indices), h, w, self.source.image_shape[2]),
                                  np.float32),
                   label=np.empty(len(indices), np.int32))
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.decode_workers, thread_name_prefix="BatchIterator-decode")
        bounds = np.linspace(0, len(indices), chunks + 1).astype(int)
        futures = [self._pool.submit(self._load, indices[a:b],
                                     None if flips is None else flips[a:b],
                                     {k: v[a:b] for k, v in out.items()})
                   for a, b in zip(bounds[:-1], bounds[1:])]
        for f in futures:
            f.result()  # re-raises a worker's error here
        return out

    def _load(self, indices: np.ndarray, flips: np.ndarray | None,
              out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Reads, flips and scales `indices`; into `out` (views of the batch) if given."""
        data = self.source.get(indices, self._image_size) if self._image_size else \
            self.source.get(indices)
        images = data["image"]
        labels = np.asarray(data["label"], np.int32)
        if np.issubdtype(images.dtype, np.floating):  # latents: already model inputs
            if self.random_flip:
                raise ValueError(f"random_flip with float (latent) images from "
                                 f"{self.source!r}; set random_flip=False")
            x = np.asarray(images, np.float32)
            if out is None:
                return dict(image=x, label=labels)
            out["image"][...] = x
        else:
            x = out["image"] if out is not None else np.empty(images.shape, np.float32)
            # uint8 -> [-1, 1]: x = u / 127.5 - 1 in float32, flipped or not, one image at
            # a time, so the passes stay in cache (measured: half the CPU of four
            # whole-batch passes at 256x256, same values).
            for i, image in enumerate(images):
                xi = x[i]
                np.multiply(image[:, ::-1] if flips is not None and flips[i] else image,
                            _SCALE, out=xi)
                xi -= 1.0
            if out is None:
                return dict(image=x, label=labels)
        out["label"][...] = labels
        return out

    # ---- iteration ----------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Global step of the next batch: start_step + batches yielded. Checkpoint this."""
        return self._step

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        return self._step * self.global_batch_size / self.num_examples

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        total = self.num_batches
        if total is not None and self._step >= total:
            raise StopIteration
        if self._prefetch > 0:
            batch = self._next_prefetched()
        else:
            batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def _next_prefetched(self) -> dict[str, np.ndarray]:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self._prefetch)
            self._thread = threading.Thread(
                target=_produce, daemon=True, name="BatchIterator-prefetch",
                args=(weakref.ref(self), self._stop, self._queue, self._step, self.num_batches))
            self._thread.start()
        step, batch = self._queue.get()
        if isinstance(batch, BaseException):
            raise batch
        assert step == self._step, (step, self._step)
        return batch

    def close(self) -> None:
        """Stops the prefetch thread and the decode threads (if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ raised
        if stop is not None:
            stop.set()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _produce(ref: "weakref.ref[BatchIterator]", stop: threading.Event, out: queue.Queue,
             step: int, total: int | None) -> None:
    """Prefetch loop. Holds the iterator only weakly, so an abandoned one is collected
    (its __del__ then sets `stop`)."""
    while not stop.is_set() and (total is None or step < total):
        it = ref()
        if it is None:
            return
        try:
            item = it.batch_at(step)
        except BaseException as e:  # handed to the consumer, raised there
            item = e
        del it
        while not stop.is_set():
            try:
                out.put((step, item), timeout=0.1)
                break
            except queue.Full:
                pass
        if isinstance(item, BaseException):
            return
        step += 1
