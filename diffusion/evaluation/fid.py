"""FID of two sample or statistics files; with --metrics also IS, precision and recall.

    python -m diffusion.evaluation.fid REF.npz SAMPLES.npz [--metrics] [--save_stats OUT.npz]
        [--features classifier | --features inception --inception_weights inception_fid.npz]

As in ADM's evaluator, the first file is the reference and the second the samples:
the Inception Score is the samples', precision and recall are the samples' against the
reference; FID is symmetric. Each file is a sample file (`arr_0` uint8 [N, H, W, C], as
`launch.py --mode sample`, DiT's sample_ddp.py and ADM write them) or a statistics file
(`mu`, `sigma`, e.g. an ADM reference batch or one written by --save_stats). See
sample_files.py.

Features: the shipped Fashion-MNIST classifier by default (offline; 28x28 grayscale,
other sizes resized and colour averaged as in training evaluation; its FID compares only
with itself), or the FID Inception-v3 from weights converted by convert_inception
(grayscale repeated to three channels). A statistics file says which features it holds
(`feature_name`; a file that does not say is taken as Inception, as ADM's and
pytorch-fid's are) and is used only with those features. --save_stats writes the
reference's statistics (mu, sigma, feature_name) to reuse in place of its images.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, Sequence

import numpy as np
from absl import app, flags

from diffusion import cli
from diffusion.evaluation import frechet, sample_files
from diffusion.evaluation.classifier import DEFAULT_WEIGHTS, fit_to_classifier
from diffusion.evaluation.evaluate import (FeatureNetwork, classifier_features,
                                           compute_features, inception_features)
from diffusion.evaluation.inception_score import inception_score
from diffusion.evaluation.precision_recall import precision_recall

# Own flag registry: importing this module (tests, launch.py) adds no global flags.
FLAGS = flags.FlagValues()
flags.DEFINE_enum("features", "classifier", ["classifier", "inception"],
                  "Feature network.", flag_values=FLAGS)
flags.DEFINE_string("inception_weights", "", "With --features inception: the .npz made by "
                    "python -m diffusion.evaluation.convert_inception.", flag_values=FLAGS)
flags.DEFINE_string("classifier_weights", "", "Classifier weights; '' = the shipped ones.",
                    flag_values=FLAGS)
flags.DEFINE_bool("metrics", False, "Also Inception Score, precision and recall (k = 3); "
                  "needs images in both files.", flag_values=FLAGS)
flags.DEFINE_string("save_stats", "", "Write the reference's mu / sigma here.",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 250, "Images per feature-network call.", flag_values=FLAGS)

USAGE = ("usage: python -m diffusion.evaluation.fid REF.npz SAMPLES.npz [--metrics] "
         "[--features classifier|inception --inception_weights FILE] [--save_stats OUT.npz]")


def feature_network(name: str, inception_weights: str, classifier_weights: str
                    ) -> FeatureNetwork:
    if name == "inception":
        if not inception_weights:
            raise ValueError("--features inception needs --inception_weights: the .npz made "
                             "by `python -m diffusion.evaluation.convert_inception`")
        return inception_features(inception_weights)
    return classifier_features(classifier_weights or DEFAULT_WEIGHTS)


def _float_batches(images: np.ndarray, net_name: str, batch_size: int) -> Iterator[Any]:
    """uint8 [N, H, W, C] -> float batches in [-1, 1] in the network's input layout."""
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].astype(np.float32) / 127.5 - 1.0
        if net_name == "classifier":
            yield fit_to_classifier(x)
        else:
            yield np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def file_stats(path: str, net: FeatureNetwork, batch_size: int,
               need_images: bool = False) -> dict[str, Any]:
    """mu, sigma (and features, probs, num_samples when computed from images) of a file."""
    batch = sample_files.load_batch(path)
    stats_net = batch.get("feature_name") or "inception"
    if "mu" in batch and stats_net == net.name and not need_images:
        return dict(mu=batch["mu"], sigma=batch["sigma"])
    if "images" not in batch:
        if need_images:
            raise ValueError(f"--metrics needs images, and {path} holds only statistics")
        raise ValueError(f"{path} holds statistics of {stats_net!r} features, not "
                         f"{net.name!r}: give its images or --features {stats_net}")
    out = compute_features(net, _float_batches(batch["images"], net.name, batch_size))
    return dict(mu=out["stats"].mu, sigma=out["stats"].cov, features=out["features"],
                probs=out["probs"], num_samples=out["num_samples"])


def evaluate_files(ref_path: str, sample_path: str, net: FeatureNetwork, *,
                   metrics: bool = False, batch_size: int = 250,
                   save_stats: str = "") -> dict[str, float]:
    """{"fid": ...} (+ "inception_score", "precision", "recall" with metrics=True)."""
    ref = file_stats(ref_path, net, batch_size, need_images=metrics)
    sample = file_stats(sample_path, net, batch_size, need_images=metrics)
    if save_stats:
        frechet.save_stats(save_stats, ref["mu"], ref["sigma"], feature_name=np.array(net.name))
    out = {"fid": frechet.frechet_distance(ref["mu"], ref["sigma"], sample["mu"],
                                           sample["sigma"])}
    if metrics:
        out["inception_score"] = inception_score(sample["probs"],
                                                 min(10, sample["num_samples"]))[0]
        m = min(len(ref["features"]), len(sample["features"]))
        out["precision"], out["recall"] = precision_recall(ref["features"][:m],
                                                           sample["features"][:m], 3)
    return out


def main(argv: Sequence[str]) -> None:
    """Parses argv (program name first), prints the metrics; a bad input exits with one
    line naming the problem."""
    try:
        paths = cli.parse(FLAGS, argv)[1:]
    except app.UsageError as e:
        sys.exit(f"fid: {e}\n{USAGE}")
    if len(paths) != 2:
        sys.exit(f"fid: give two files (reference and samples), got {len(paths)}\n{USAGE}")
    try:
        net = feature_network(FLAGS.features, FLAGS.inception_weights, FLAGS.classifier_weights)
        out = evaluate_files(*paths, net, metrics=FLAGS.metrics, batch_size=FLAGS.batch_size,
                             save_stats=FLAGS.save_stats)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"fid: {e}")
    print(f"features: {net.name}")
    print(f"FID: {out['fid']}")
    if FLAGS.metrics:
        print(f"Inception Score: {out['inception_score']}")
        print(f"Precision: {out['precision']}")
        print(f"Recall: {out['recall']}")


if __name__ == "__main__":
    cli.run(main, FLAGS)
