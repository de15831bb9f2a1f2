"""Feature networks behind one interface, reference statistics, and `evaluate_samples`.

A FeatureNetwork maps images [B, H, W, C] in [-1, 1] to dict(pool=[B, D],
logits=[B, K]). Features are computed batch by batch on device (the batch sharded over
the mesh's 'data' axis when a mesh is given, parameters replicated) and folded into
streaming statistics, so N samples never need to sit on the device at once.

evaluate_samples returns metrics named after the feature network and the sample count,
e.g. {"fid_classifier@1000": ..., "is_classifier@1000": ..., "precision_classifier@1000":
..., "recall_classifier@1000": ..., "num_samples": 1000}: FIDs from different feature
networks or sample counts are not comparable, and the names say so.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion.evaluation import classifier as classifier_lib
from diffusion.evaluation import frechet
from diffusion.evaluation import inception as inception_lib
from diffusion.evaluation.inception_score import inception_score
from diffusion.evaluation.inception_weights import load_inception_weights
from diffusion.evaluation.precision_recall import precision_recall


class FeatureNetwork:
    """A named, jitted feature extractor: images [B, H, W, C] -> dict(pool, logits)."""

    def __init__(self, name: str, apply_fn: Callable[[Any, jax.Array], dict[str, jax.Array]],
                 variables: Any):
        self.name = name
        self.variables = variables
        # Variables are an argument, not a closure constant: a 24M-parameter Inception baked
        # into the HLO as constants compiles slowly.
        self._apply = jax.jit(apply_fn)
        self._replicated: dict[Mesh, Any] = {}

    def __call__(self, images: jax.Array, mesh: Mesh | None = None) -> dict[str, jax.Array]:
        if mesh is None:
            return self._apply(self.variables, images)
        if mesh not in self._replicated:
            self._replicated[mesh] = jax.device_put(self.variables, NamedSharding(mesh, P()))
        return self._apply(self._replicated[mesh], images)


def classifier_features(path: str, dtype: Any = jnp.float32) -> FeatureNetwork:
    """The project's own Fashion-MNIST classifier (128-d features, 10 logits)."""
    model = classifier_lib.SmallClassifier(dtype=dtype)
    params = classifier_lib.load_classifier(path, model)
    return FeatureNetwork("classifier", lambda v, x: model.apply(v, x), {"params": params})


def inception_features(path: str, resize_to: int = 299,
                       dtype: Any = jnp.float32) -> FeatureNetwork:
    """FID Inception-v3 (2048-d pool3 features, 1008 logits) from a converted .npz."""
    model = inception_lib.InceptionV3FID(resize_to=resize_to, dtype=dtype)
    variables = load_inception_weights(path)
    return FeatureNetwork("inception", lambda v, x: model.apply(v, x), variables)


def _image_batches(samples: np.ndarray | Iterable[Any], batch_size: int):
    """Yields host image batches [b, H, W, C] from an array or an iterable of batches
    (arrays, or dicts with an 'image' entry as the data pipeline yields)."""
    if isinstance(samples, (np.ndarray, jax.Array)):
        if samples.ndim != 4:
            raise ValueError(f"samples must be [N, H, W, C], got shape {samples.shape}")
        for start in range(0, samples.shape[0], batch_size):
            yield samples[start:start + batch_size]
        return
    for batch in samples:
        images = batch["image"] if isinstance(batch, dict) else batch
        if images.ndim != 4:
            raise ValueError(f"each batch must be [B, H, W, C], got shape {images.shape}")
        yield images


def _device_batch(images: Any, mesh: Mesh | None) -> tuple[jax.Array, int]:
    """Places a batch on device; with a mesh, pads it to a multiple of the data axis."""
    n = images.shape[0]
    if mesh is None:
        return jnp.asarray(images, jnp.float32), n
    shards = mesh.shape["data"]
    pad = (-n) % shards
    images = np.asarray(images, np.float32)
    if pad:
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
    return jax.device_put(images, NamedSharding(mesh, P("data"))), n


def compute_features(feature_fn: FeatureNetwork, samples: np.ndarray | Iterable[Any], *,
                     batch_size: int = 250, mesh: Mesh | None = None,
                     max_kept: int = 10_000, max_samples: int | None = None
                     ) -> dict[str, Any]:
    """Streams samples through feature_fn.

    Returns dict(stats=FeatureStats over all samples, features=[<= max_kept, D] kept for
    precision/recall, probs=[N, K] softmax of the logits, num_samples=N).
    """
    stats = None
    kept, probs, n_total = [], [], 0
    n_kept = 0
    for images in _image_batches(samples, batch_size):
        if max_samples is not None and n_total >= max_samples:
            break
        if max_samples is not None:
            images = images[:max_samples - n_total]
        x, n = _device_batch(images, mesh)
        # To host before dropping the padding: slicing a batch-sharded array is a gather
        # that explicit-sharding meshes refuse, and the host needs the features anyway.
        out = jax.device_get(feature_fn(x, mesh))
        pool = np.asarray(out["pool"][:n], np.float32)
        if stats is None:
            stats = frechet.FeatureStats(pool.shape[1])
        stats.update(pool)
        if n_kept < max_kept:
            kept.append(pool[:max_kept - n_kept])
            n_kept += kept[-1].shape[0]
        probs.append(scipy.special.softmax(np.asarray(out["logits"][:n], np.float64), axis=-1))
        n_total += n
    if stats is None:
        raise ValueError("no samples were given")
    return dict(stats=stats, features=np.concatenate(kept), probs=np.concatenate(probs),
                num_samples=n_total)


def reference_stats(feature_fn: FeatureNetwork, data_iter: Iterable[Any],
                    cache_path: str | None, *, mesh: Mesh | None = None,
                    max_kept: int = 10_000, max_samples: int | None = None
                    ) -> dict[str, Any]:
    """mu, cov (and kept features for precision/recall) of a dataset, cached in an .npz.

    The cache records the feature network's name; a cache made with another network is
    an error, not a silent mismatch. Delete the file to recompute.
    """
    if cache_path and os.path.exists(cache_path):
        ref = frechet.load_stats(cache_path)
        cached_name = str(ref.get("feature_name", ""))
        if cached_name != feature_fn.name:
            raise ValueError(f"{cache_path} holds statistics of {cached_name!r} features, not "
                             f"{feature_fn.name!r}; delete it or pass another cache path")
        ref["num_samples"] = int(ref["num_samples"])
        return ref
    out = compute_features(feature_fn, data_iter, mesh=mesh, max_kept=max_kept,
                           max_samples=max_samples)
    ref = dict(mu=out["stats"].mu, cov=out["stats"].cov, features=out["features"],
               num_samples=out["num_samples"], feature_name=feature_fn.name)
    if cache_path:
        frechet.save_stats(cache_path, ref["mu"], ref["cov"], features=ref["features"],
                           num_samples=np.int64(ref["num_samples"]),
                           feature_name=np.array(feature_fn.name))
    return ref


def evaluate_samples(samples: np.ndarray | Iterable[Any], feature_fn: FeatureNetwork,
                     ref_stats: dict[str, Any], *, batch_size: int = 250,
                     mesh: Mesh | None = None, k: int = 3, num_splits: int = 10,
                     max_pr_samples: int = 10_000) -> dict[str, float]:
    """FID, Inception Score and k-NN precision/recall of samples against ref_stats.

    samples: images [N, H, W, C] in [-1, 1], or an iterable of such batches.
    ref_stats: from reference_stats (needs 'mu', 'cov', and 'features' for
    precision/recall). Precision/recall use equally many real and generated features,
    at most max_pr_samples of each. Returns names like "fid_<network>@<N>".
    """
    out = compute_features(feature_fn, samples, batch_size=batch_size, mesh=mesh,
                           max_kept=max_pr_samples)
    n = out["num_samples"]
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    suffix = f"{feature_fn.name}@{n}"
    metrics = {"num_samples": n}
    metrics[f"fid_{suffix}"] = frechet.frechet_distance(
        out["stats"].mu, out["stats"].cov, ref_stats["mu"], ref_stats["cov"])
    metrics[f"is_{suffix}"] = inception_score(out["probs"], min(num_splits, n))[0]
    if "features" in ref_stats:
        m = min(len(ref_stats["features"]), len(out["features"]))
        if m > k:
            precision, recall = precision_recall(ref_stats["features"][:m], out["features"][:m], k)
            metrics[f"precision_{suffix}"] = precision
            metrics[f"recall_{suffix}"] = recall
    return metrics
