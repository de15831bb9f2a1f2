"""Images/s of the batch iterator over a tfds array_record dataset: decode, crop, flip,
scale to [-1, 1], and (--shard) the device_put of each batch over the CPU devices.

    python -m experiments.input_pipeline.run [--sizes 32,256] [--modes old,threads] [--reps 5]

Builds two synthetic tfds datasets once (in --data_dir, default a temp dir) in the
format of the real catalogue: `bench_png32`, 32x32x3 PNG images like CIFAR-10, and
`bench_jpeg256`, 256x256x3 JPEG (quality 90) images of smooth random colour fields
with noise, like ImageNet at 256. For each size it times `--batches` batches of the
BatchIterator (batch 256 at 32x32, 64 at 256x256; random flips on) per mode (see
MODES: "old" decodes every example on every visit in the calling thread, as before
issue 12; "threads" on one thread per core; "threads+cache" also keeps decoded
images in memory, timed after one pass that fills the cache), interleaving the modes
over `--reps` rounds. Prints median img/s, min, max, cores used (process CPU time /
wall time: on a shared machine other jobs take the rest), img per CPU-second (the
per-core rate, robust to load from other jobs) and n per mode.
"""
from __future__ import annotations

import io
import os
import statistics
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import app, flags

from diffusion import cli

NUM_EXAMPLES = {32: 20000, 256: 2000}
BATCH = {32: 256, 256: 64}


def _encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _images(size: int, n: int, seed: int):
    """Smooth colour fields (upsampled 8x8 noise) plus pixel noise: compress like photos."""
    rng = np.random.default_rng(seed)
    from PIL import Image
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR), np.int16)
        img = img + rng.integers(-12, 13, img.shape, dtype=np.int16)
        yield i, np.clip(img, 0, 255).astype(np.uint8)


def build(data_dir: str, size: int) -> str:
    import tensorflow_datasets as tfds
    fmt = "PNG" if size == 32 else "JPEG"
    name = f"bench_{fmt.lower()}{size}"
    n = NUM_EXAMPLES[size]

    dataset_name = name

    class Builder(tfds.core.GeneratorBasedBuilder):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format=fmt.lower()),
                "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, img in _images(size, n, size):
                yield i, {"image": _encode(img, fmt), "label": i % 10}

    builder = Builder(data_dir=data_dir)
    if not builder.is_prepared():
        t0 = time.perf_counter()
        builder.download_and_prepare(file_format="array_record")
        print(f"prepared {name} ({n} images) in {time.perf_counter() - t0:.0f} s", flush=True)
    return name


# name -> (decode_workers, cache_decoded); "old" is the path before issue 12 (commit
# 2b6018d): one thread, every example read and decoded on every visit, flips and the
# [-1, 1] scaling as whole-batch passes (old_batch_at reproduces it).
MODES = {"old": (0, False), "threads": (-1, False), "threads+cache": (-1, True)}


def old_batch_at(it, step: int) -> dict:
    """BatchIterator.batch_at as it was before issue 12, for uint8 sources."""
    indices = it.indices_at(step)
    data = it.source.get(indices, it._image_size) if it._image_size else \
        it.source.get(indices)
    images = data["image"]
    if it.random_flip:
        flips = it.flips_at(step)[:len(indices)]
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    x = images.astype(np.float32)
    x *= 1.0 / 127.5
    x -= 1.0
    return dict(image=x, label=np.asarray(data["label"], np.int32))


FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "bench_tfds"),
                    "where the synthetic datasets are built", flag_values=FLAGS)
flags.DEFINE_string("sizes", "32,256", "image sizes, comma-separated: 32 and/or 256",
                    flag_values=FLAGS)
flags.DEFINE_string("modes", ",".join(MODES), f"comma-separated, of {list(MODES)}",
                    flag_values=FLAGS)
flags.DEFINE_integer("batches", 20, "batches per timing", flag_values=FLAGS)
flags.DEFINE_integer("reps", 5, "rounds", flag_values=FLAGS)
flags.DEFINE_bool("shard", False, "also device_put each batch", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    args = FLAGS
    from diffusion import cpu_devices
    if args.shard:
        cpu_devices.configure("auto")
    from diffusion import data
    put = None
    if args.shard:
        from diffusion import parallel
        mesh = parallel.make_mesh()

        def put(batch):
            import jax
            return jax.block_until_ready(parallel.global_batch(batch, mesh))

    print(f"cores {cpu_devices.available_cores()}, numpy {np.__version__}", flush=True)
    modes = args.modes.split(",")
    for size in (int(s) for s in args.sizes.split(",")):
        name = build(args.data_dir, size)
        bs = BATCH[size]
        sources = {}
        for mode in modes:
            workers, cache = MODES[mode]
            sources[mode] = data.make_source(f"tfds:{name}", data_dir=args.data_dir,
                                             cache_decoded=cache)
            if cache:  # fill the cache: one pass over the dataset, timed
                it = data.BatchIterator(sources[mode], bs, seed=0, shuffle=False,
                                        image_size=size, decode_workers=workers)
                t0 = time.perf_counter()
                for _ in range(-(-len(sources[mode]) // bs)):
                    next(it)
                it.close()
                print(f"{size}x{size} {mode}: first epoch (fills the cache) "
                      f"{len(sources[mode]) / (time.perf_counter() - t0):.0f} img/s, cached "
                      f"{sources[mode].cached_fraction:.0%}", flush=True)
        check = data.BatchIterator(sources[modes[-1]], bs, seed=0, random_flip=True,
                                   image_size=size)
        for k, v in old_batch_at(check, 0).items():  # same batches, old path and new
            np.testing.assert_array_equal(v, check.batch_at(0)[k])
        check.close()
        rates = {m: [] for m in modes}
        cpu = {m: [] for m in modes}
        for r in range(args.reps):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                it = data.BatchIterator(sources[mode], bs, seed=r + 1, random_flip=True,
                                        image_size=size, decode_workers=MODES[mode][0])
                next(it)  # pool start-up out of the timing
                t0, c0 = time.perf_counter(), time.process_time()
                for k in range(args.batches):
                    batch = old_batch_at(it, 1 + k) if mode == "old" else next(it)
                    if put is not None:
                        put(batch)
                wall = time.perf_counter() - t0
                rates[mode].append(args.batches * bs / wall)
                cpu[mode].append((time.process_time() - c0) / wall)
                it.close()
            print(f"{size}x{size} round {r}: " + ", ".join(
                f"{m} {rates[m][-1]:.0f} img/s ({cpu[m][-1]:.2f} cores)" for m in modes),
                flush=True)
        print(f"\n{size}x{size} {'PNG' if size == 32 else 'JPEG'}, batch {bs}, "
              f"{args.batches} batches per timing, random flips, shard={args.shard}\n")
        print("| mode | decode_workers | img/s median | min | max | cores used | "
              "img per CPU-s | n |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for m in modes:
            v, c = rates[m], statistics.median(cpu[m])
            w = MODES[m][0]
            print(f"| {m} | {'auto' if w < 0 else w} | {statistics.median(v):.0f} | "
                  f"{min(v):.0f} | {max(v):.0f} | {c:.2f} | {statistics.median(v) / c:.0f} | "
                  f"{len(v)} |")
        print(flush=True)


if __name__ == "__main__":
    cli.run(main, FLAGS)
