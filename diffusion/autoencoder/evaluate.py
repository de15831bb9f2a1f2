"""Reconstruction quality of a trained autoencoder: PSNR, SSIM and reconstruction FID.

    python -m diffusion.autoencoder.evaluate --workdir=runs/vae_fashion_mnist \\
        [--split=test] [--num_examples=10000] [--batch_size=250] [--step=N] [--no_fid]

The VAE is the run's config.json and the EMA params of its newest checkpoint (or
--step), loaded by diffusion.pretrained.load_vae_run without its optimizer state or
dataset; the images are the run's data source, split --split. Reconstructions go
through the posterior mean. rFID is the Frechet distance between features of the
reconstructions and of the originals of the same examples, with the feature network
the run's config names in `eval` (feature_net, feature_weights): the project's
Fashion-MNIST classifier (28x28 grey; other images are resized and their colour
averaged, so its rFID compares only with itself) or the FID Inception-v3. Prints one
JSON line, e.g.
{"psnr": 28.1, "ssim": 0.93, "rfid_classifier@10000": 1.7, "num_examples": 10000}.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from diffusion import cli, pretrained
from diffusion.autoencoder.decode import reconstruct
from diffusion.autoencoder.metrics import psnr, ssim
from diffusion.autoencoder.train_step import ssim_window
from diffusion.data import BatchIterator, make_source
from diffusion.evaluation import (FeatureNetwork, FeatureStats, classifier_features,
                                  frechet_distance, inception_features)
from diffusion.evaluation.classifier import DEFAULT_WEIGHTS, fit_to_classifier

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "Workdir of a train.objective='vae' run.",
                    flag_values=FLAGS)
flags.DEFINE_integer("step", None, "Checkpoint step; default the newest finished one.",
                     flag_values=FLAGS)
flags.DEFINE_string("split", "test", "Split of the run's data source.", flag_values=FLAGS)
flags.DEFINE_integer("num_examples", 10_000, "Examples to reconstruct (at most the split).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 250, "Images per call.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_bool("no_fid", False, "PSNR and SSIM only.", flag_values=FLAGS)
flags.mark_flag_as_required("workdir", flag_values=FLAGS)


def feature_network(eval_config: Any) -> FeatureNetwork:
    """The FeatureNetwork named by a config's `eval` section (feature_net, feature_weights)."""
    name, weights = eval_config.feature_net, eval_config.feature_weights
    if name == "classifier":
        return classifier_features(weights or DEFAULT_WEIGHTS)
    if name == "inception":
        if not weights:
            raise ValueError("eval.feature_net='inception' needs eval.feature_weights: the "
                             ".npz made by `python -m diffusion.evaluation.convert_inception`")
        return inception_features(weights)
    raise ValueError(f"unknown eval.feature_net {name!r}; known: classifier, inception")


def _features(feature_fn: FeatureNetwork, x: jnp.ndarray) -> jnp.ndarray:
    if feature_fn.name == "classifier":
        x = fit_to_classifier(x)
    elif feature_fn.name == "inception" and x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return feature_fn(x)["pool"]


def evaluate_reconstructions(vae, params: Any, batches: Iterable[np.ndarray],
                             feature_fn: FeatureNetwork | None = None) -> dict[str, float]:
    """Mean PSNR / SSIM (and rFID with a feature_fn) over image batches [b, H, W, C]
    in [-1, 1]."""
    n, psnr_sum, ssim_sum = 0, 0.0, 0.0
    real, fake = None, None
    for x in batches:
        x = jnp.asarray(x, jnp.float32)
        x_hat = reconstruct(vae, params, x)
        psnr_sum += float(jnp.sum(psnr(x, x_hat)))
        ssim_sum += float(jnp.sum(ssim(x, x_hat, window_size=ssim_window(x.shape[1:3]))))
        n += x.shape[0]
        if feature_fn is not None:
            f_real, f_fake = _features(feature_fn, x), _features(feature_fn, x_hat)
            if real is None:
                real, fake = FeatureStats(f_real.shape[1]), FeatureStats(f_real.shape[1])
            real.update(f_real)
            fake.update(f_fake)
    if n == 0:
        raise ValueError("no images to reconstruct")
    out = {"psnr": psnr_sum / n, "ssim": ssim_sum / n, "num_examples": n}
    if feature_fn is not None:
        if n < 2:
            raise ValueError(f"rFID needs at least 2 examples, got {n}")
        out[f"rfid_{feature_fn.name}@{n}"] = float(
            frechet_distance(fake.mu, fake.cov, real.mu, real.cov))
    return out


def _first(batches: Iterable[dict], limit: int) -> Iterator[np.ndarray]:
    """The images of the first `limit` examples of `batches`."""
    seen = 0
    for batch in batches:
        if seen >= limit:
            return
        x = batch["image"][:limit - seen]
        seen += len(x)
        yield x


def main(argv: Sequence[str]) -> dict[str, float]:
    """Evaluates the flags' run; returns (and prints) the metrics."""
    cli.parse(FLAGS, argv)
    run = pretrained.load_vae_run(FLAGS.workdir, FLAGS.step, devices=jax.devices()[:1])
    config = run.config
    source = make_source(config.data.source, FLAGS.split, config.data.data_dir or None)
    size = int(config.data.image_size) or source.image_shape[0]
    batches = BatchIterator(source, FLAGS.batch_size, 0, shuffle=False, num_epochs=1,
                            drop_remainder=False, image_size=size)
    feature_fn = None if FLAGS.no_fid else feature_network(config.eval)
    out = evaluate_reconstructions(run.model, run.params, _first(batches, FLAGS.num_examples),
                                   feature_fn)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    cli.run(main, FLAGS)
