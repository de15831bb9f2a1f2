"""Reconstruction quality of a trained autoencoder: PSNR, SSIM and reconstruction FID.

    python -m diffusion.vae_eval --workdir runs/vae_fashion_mnist [--split test]
        [--num_examples 10000] [--batch_size 250]

Reconstructions use the EMA params of the workdir's newest checkpoint and the
posterior mean. rFID is the Frechet distance between features of the reconstructions
and of the originals of the same examples, with the feature network the run's config
names in `eval` (feature_net, feature_weights): the project's Fashion-MNIST classifier
(28x28 grey; other sizes are resized to it, so its rFID compares only with itself) or
the FID Inception-v3. Prints one JSON line, e.g.
{"psnr": 28.1, "ssim": 0.93, "rfid_classifier@10000": 1.7, "num_examples": 10000}.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.image_metrics import psnr, ssim

CLASSIFIER_SIZE = 28


def feature_network(eval_config) -> Any:
    """The FeatureNetwork named by a config's `eval` section."""
    from diffusion.train.evaluator import feature_network as named_network
    return named_network(eval_config.feature_net, eval_config.feature_weights)


def _features(feature_fn, x: jnp.ndarray) -> jnp.ndarray:
    if feature_fn.name == "classifier" and x.shape[1:3] != (CLASSIFIER_SIZE,) * 2:
        x = jax.image.resize(x, (x.shape[0], CLASSIFIER_SIZE, CLASSIFIER_SIZE, x.shape[3]),
                             "linear", antialias=True)
    return feature_fn(x)["pool"]


def evaluate_reconstructions(vae, params, batches: Iterable[np.ndarray],
                             feature_fn=None) -> dict[str, float]:
    """Mean PSNR / SSIM (and rFID with a feature_fn) over image batches [b, H, W, C]
    in [-1, 1]."""
    from diffusion.evaluation import FeatureStats, frechet_distance
    from diffusion.train.vae_objective import reconstruct
    from diffusion.vae_train import ssim_window
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="workdir of a train.objective='vae' run")
    p.add_argument("--split", default="test")
    p.add_argument("--num_examples", type=int, default=10_000)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--no_fid", action="store_true", help="PSNR and SSIM only")
    args = p.parse_args(argv)

    from diffusion.data import BatchIterator, make_source
    from diffusion.train.latent_decoding import load_vae_workdir
    from diffusion.train.setup import read_run_config
    config = read_run_config(args.workdir)
    vae, params = load_vae_workdir(args.workdir, jax.devices()[:1])
    source = make_source(config.data.source, args.split, config.data.data_dir or None)
    size = int(config.data.image_size) or source.image_shape[0]
    it = BatchIterator(source, args.batch_size, 0, shuffle=False, num_epochs=1,
                       drop_remainder=False, image_size=size)
    limit = args.num_examples

    def batches():
        seen = 0
        for batch in it:
            if seen >= limit:
                return
            x = batch["image"][:limit - seen]
            seen += len(x)
            yield x
    feature_fn = None if args.no_fid else feature_network(config.eval)
    print(json.dumps(evaluate_reconstructions(vae, params, batches(), feature_fn)))


if __name__ == "__main__":
    main()
