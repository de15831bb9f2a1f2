"""Writes the (sample, noise) pairs of a trained flow model, the data of reflow.

    python -m diffusion.reflow_pairs --workdir runs/flow_fashion_mnist --num 50000 \\
        --steps 50 --out runs/flow_fashion_mnist/pairs.npy

then train on them with `configs/reflow_fashion_mnist.py` (data.source
pairs:runs/flow_fashion_mnist/pairs.npy). The run is loaded with `diffusion.load` (its
config.json and EMA params, no dataset) and sampled with an ODE sampler in t that starts
at t = 1, flow_euler or flow_midpoint (--sampler; flow_midpoint's NFE is 2 x --steps),
where the start state is the noise itself: x_1 = alpha(1) x0 + sigma(1) eps = eps on the
flow path, so pair i is (x0_i, eps_i) exactly, eps_i the per-sample noise the sampler
drew. The pairs are drawn in chunks of --chunk, chunk k with the seed
SeedSequence([seed, k]) and noise fold_in(key(that seed), i) for its sample i, written
into one float32 [N, 2, H, W, C] file (diffusion.data.pairs; class labels i % K beside
it for a class-conditional run, sampled with the run's guidance weight) that appears at
--out only when complete.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import jax
import numpy as np
from absl import flags

from diffusion import cli, pretrained
from diffusion.data.pairs import PairWriter
from diffusion.samplers.base import initial_noise, sample_keys

ODE_SAMPLERS = ("flow_euler", "flow_midpoint")

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Workdir of a trained flow run.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output .npy file of the pairs.", flag_values=FLAGS)
flags.DEFINE_integer("num", 50000, "Number of pairs.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 50, "Sampler steps.", flag_values=FLAGS)
flags.DEFINE_enum("sampler", "flow_midpoint", list(ODE_SAMPLERS), "ODE sampler in t.",
                  flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Base seed of the noise.", flag_values=FLAGS)
flags.DEFINE_integer("chunk", 4096, "Pairs drawn and written per call.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 0, "Images per sampling call (0 = the run's "
                     "sample.batch_size).", flag_values=FLAGS)
flags.DEFINE_integer("step", -1, "Checkpoint step (-1 = the newest).", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)

log = logging.getLogger(__name__)


def chunk_seed(seed: int, k: int) -> int:
    """The sampling seed of chunk k (a 31-bit int from SeedSequence([seed, k]))."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0] >> 1)


def check_starts_at_noise(pipe: pretrained.Pipeline) -> None:
    """The run's path must end in pure noise (alpha(1) = 0, sigma(1) = 1), where the
    sampler's start state is the noise itself."""
    path = pipe.denoiser.schedule
    a, s = float(path.host.alpha(1.0)), float(path.host.sigma(1.0))
    if abs(a) > 1e-6 or abs(s - 1.0) > 1e-6:
        raise ValueError(f"{pipe.workdir}: its path {getattr(path, 'name', path)!r} has "
                         f"alpha(1) = {a:.3g}, sigma(1) = {s:.3g}; reflow pairs need a path "
                         "that ends in pure noise (a flow run: train.objective=flow)")


def write_pairs_of(pipe: pretrained.Pipeline, out: str, num: int, steps: int,
                   sampler: str = "flow_midpoint", seed: int = 0, chunk: int = 4096,
                   batch_size: int = 0) -> str:
    """Samples `num` pairs from the restored run `pipe` into `out`; returns its path."""
    if sampler not in ODE_SAMPLERS:
        raise ValueError(f"reflow pairs need an ODE sampler that starts at t = 1: one of "
                         f"{ODE_SAMPLERS}, got {sampler!r}")
    if chunk < 1 or num < 1:
        raise ValueError(f"num and chunk must be >= 1, got {num}, {chunk}")
    check_starts_at_noise(pipe)
    k_classes = pipe.num_classes
    writer = PairWriter(out, num, pipe.image_shape, with_labels=k_classes > 0)
    t0 = time.perf_counter()
    for k, start in enumerate(range(0, num, chunk)):
        n = min(chunk, num - start)
        s = chunk_seed(seed, k)
        labels = (start + np.arange(n)) % k_classes if k_classes else None
        x0 = pipe.sample(sampler, steps=steps, num=n, seed=s, labels=labels,
                         batch_size=batch_size or None, t_max=1.0)
        # The sampler's start state: sample i's noise fold_in(key(s), i), salt 0, times
        # start_std(1) = 1 on a path with alpha(1) = 0, sigma(1) = 1.
        eps = np.asarray(initial_noise(sample_keys(jax.random.key(s), n),
                                       (n, *pipe.image_shape)))
        writer.write(start, x0, eps, labels)
        log.info("pairs %d / %d (%.1f s)", start + n, num, time.perf_counter() - t0)
    return writer.close()


def main(argv: Sequence[str]) -> str:
    cli.parse(FLAGS, argv)
    pipe = pretrained.load(FLAGS.workdir, step=None if FLAGS.step < 0 else FLAGS.step)
    path = write_pairs_of(pipe, FLAGS.out, FLAGS.num, FLAGS.steps, FLAGS.sampler,
                          FLAGS.seed, FLAGS.chunk, FLAGS.batch_size)
    print(f"wrote {FLAGS.num} pairs of {pipe.workdir} (step {pipe.step}, {FLAGS.sampler} "
          f"x {FLAGS.steps}) to {path}")
    return path


if __name__ == "__main__":
    cli.run(main, FLAGS)
