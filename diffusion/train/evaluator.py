"""Periodic sample-quality evaluation inside training (and for a finished workdir).

Draws `eval.num_samples` images from the EMA params with `eval.sampler` and
`eval.num_steps`, and scores them against the reference split of the training data in
the features of `eval.feature_net`: the shipped Fashion-MNIST classifier (works
offline) or Inception-v3 from a weights file the user converted. Metric names carry
the sample count ("fid_classifier@1000"). Reference statistics are cached per dataset,
split, size and feature network in the workdir.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from diffusion import evaluation, sampling
from diffusion.data import BatchIterator, make_source
from diffusion.evaluation.classifier import DEFAULT_WEIGHTS as DEFAULT_CLASSIFIER
from diffusion.evaluation.classifier import fit_to_classifier
from diffusion.train.setup import Run


def feature_network(name: str, weights: str):
    if name == "classifier":
        path = weights or DEFAULT_CLASSIFIER
        if not os.path.exists(path):
            raise FileNotFoundError(f"classifier weights {path} not found; train them with "
                                    f"`python -m diffusion.evaluation.train_classifier --out {path}`")
        return evaluation.classifier_features(path)
    if name == "inception":
        if not weights:
            raise ValueError("eval.feature_net='inception' needs eval.feature_weights: the .npz "
                             "made by `python -m diffusion.evaluation.convert_inception`")
        return evaluation.inception_features(weights)
    raise ValueError(f"unknown eval.feature_net {name!r}; known: classifier, inception")


def _fit_to(images: np.ndarray, net_name: str) -> np.ndarray:
    """The classifier takes 28x28x1: resize (and average colour) other image sizes."""
    if net_name != "classifier":
        return images
    return np.asarray(fit_to_classifier(images))


def make_evaluator(run: Run, sample_fn_for: Callable) -> Callable:
    """Returns evaluate(params) -> dict of metrics of samples drawn with `params`."""
    c = run.config
    net = feature_network(c.eval.feature_net, c.eval.feature_weights)
    ref_name = c.eval.reference_source or c.data.source
    if ref_name.startswith("latents:"):
        raise ValueError("evaluating a latent-diffusion run needs the pixel dataset its "
                         "samples are compared with: set eval.reference_source (e.g. "
                         "fashion_mnist_idx)")
    same = ref_name == c.data.source  # else (latent runs) at the reference's own size
    ref_source = make_source(ref_name, c.eval.reference_split,
                             (c.data.data_dir or None) if same else None)
    h, w = run.image_shape[:2] if same else ref_source.image_shape[:2]
    cache = os.path.join(run.workdir, f"ref_stats_{net.name}_{c.eval.reference_split}_"
                         f"{h}x{w}.npz")
    batches = BatchIterator(ref_source, 250, 0, shuffle=False, image_size=(h, w),
                            num_epochs=1, drop_remainder=False)
    ref = evaluation.reference_stats(net, ({"image": _fit_to(b["image"], net.name)}
                                           for b in batches), cache)
    n_dev = run.mesh.devices.size
    bs = -(-min(c.sample.batch_size, c.eval.num_samples) // n_dev) * n_dev
    fn = sample_fn_for(run, c.eval.sampler, c.eval.num_steps, bs)
    key = jax.random.key(c.sample.seed + 1)

    def evaluate(params) -> dict:
        x = sampling.generate(fn, params, key, c.eval.num_samples, bs, c.sample.guidance_scale)
        metrics = evaluation.evaluate_samples(_fit_to(x, net.name), net, ref)
        return {k: float(v) for k, v in metrics.items()}

    return evaluate
