"""Sample-quality metrics against a known mixture, with no feature network.

- mean_log_likelihood: average log p(x) of samples under the true mixture (nats per
  sample). Its counterpart for true samples, `entropy_baseline`, is -H(p). A sampler
  that over-concentrates on modes can score above the baseline, so read it together
  with the distribution metrics below.
- mode_weights / mode_tv: each sample goes to its most responsible component; the
  total-variation distance between those fractions and the true weights.
- sliced_wasserstein: SW_2 between samples and true samples over random directions
  (finite-sample floor: the same metric between two sets of true samples).
- rmse / per_sample_rmse / mode_flips / convergence_order: error of an ODE sampler
  against a reference solve from the same x_T (overall, per sample, and the fraction of
  trajectories that changed mode), and the slope of log error against log NFE.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.analytic import gmm as gmm_lib
from diffusion.analytic.gmm import GaussianMixture


def _flat(x) -> jnp.ndarray:
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape[0], -1)


def _batched(fn, x, batch_size: int):
    return np.concatenate([np.asarray(fn(x[i:i + batch_size]))
                           for i in range(0, x.shape[0], batch_size)])


def log_likelihoods(gmm: GaussianMixture, x, y=None, batch_size: int = 1000) -> np.ndarray:
    """[N] log p(x) (log p(x | y) for labels y [N]) under the clean data mixture."""
    x = _flat(x)
    if y is None:
        return _batched(lambda xb: gmm_lib.log_prob(gmm, xb), x, batch_size)
    y = jnp.asarray(y, jnp.int32)
    out = [gmm_lib.log_prob(gmm, x[i:i + batch_size], y=y[i:i + batch_size])
           for i in range(0, x.shape[0], batch_size)]
    return np.concatenate([np.asarray(o) for o in out])


def mean_log_likelihood(gmm: GaussianMixture, x, y=None) -> float:
    """Average log p(x) of samples x [N, ...] (nats per sample)."""
    return float(np.mean(log_likelihoods(gmm, x, y)))


def entropy_baseline(gmm: GaussianMixture, key: jax.Array, num_samples: int = 20000,
                     y=None) -> float:
    """E_p[log p(x)] = -H(p), Monte-Carlo over true samples (given labels y)."""
    if y is not None:
        y = jnp.resize(jnp.asarray(y, jnp.int32), (num_samples,))
    x, _ = gmm_lib.sample(gmm, key, num_samples, y)
    return mean_log_likelihood(gmm, x, y)


def mode_assignments(gmm: GaussianMixture, x, batch_size: int = 1000) -> np.ndarray:
    """[N] index of each sample's most responsible component (of the whole mixture)."""
    x = _flat(x)
    return _batched(lambda xb: jnp.argmax(gmm_lib.component_log_probs(gmm, xb), 1), x,
                    batch_size)


def mode_weights(gmm: GaussianMixture, x) -> np.ndarray:
    """[K] fraction of samples assigned to each component."""
    counts = np.bincount(mode_assignments(gmm, x), minlength=gmm.num_components)
    return counts / counts.sum()


def true_mode_weights(gmm: GaussianMixture, y: Optional[Sequence[int]] = None) -> np.ndarray:
    """[K] component weights the samples should show: the mixture weights, or with
    labels y [N] the average of the class-conditional weights."""
    if y is None:
        return np.asarray(gmm.weights, np.float64)
    y = np.asarray(y)
    labels, counts = np.unique(y, return_counts=True)
    return sum(c * gmm.class_weights(int(l)) for l, c in zip(labels, counts)) / len(y)


def mode_tv(gmm: GaussianMixture, x, y=None) -> float:
    """Total variation between the samples' mode weights and the true ones, in [0, 1]."""
    return float(0.5 * np.abs(mode_weights(gmm, x) - true_mode_weights(gmm, y)).sum())


def sliced_wasserstein(x, x_ref, key: jax.Array, num_projections: int = 256) -> float:
    """Sliced Wasserstein-2 distance between x [N, ...] and x_ref [N, ...].

    Both are projected on the same random unit directions; W_2 in 1-D is the RMS
    difference of the sorted projections. Returns sqrt(mean over directions of W_2^2).
    """
    x, x_ref = np.asarray(_flat(x), np.float64), np.asarray(_flat(x_ref), np.float64)
    if x.shape != x_ref.shape:
        raise ValueError(f"sliced Wasserstein needs equally many samples of equal size, "
                         f"got {x.shape} and {x_ref.shape}")
    dirs = np.asarray(jax.random.normal(key, (x.shape[1], num_projections)), np.float64)
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    # numpy: XLA's CPU sort of [N, P] is many times slower.
    px, pr = np.sort(x @ dirs, axis=0), np.sort(x_ref @ dirs, axis=0)
    return float(np.sqrt(np.mean((px - pr) ** 2)))


def rmse(x, x_ref) -> float:
    """Root mean squared difference over samples and dimensions."""
    x, x_ref = _flat(x), _flat(x_ref)
    if x.shape != x_ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {x_ref.shape}")
    return float(jnp.sqrt(jnp.mean((x - x_ref) ** 2)))


def per_sample_rmse(x, x_ref) -> np.ndarray:
    """[N] RMS difference of each sample over its dimensions. Its median ignores the
    rare trajectory that ends in another mode, which alone can dominate `rmse`."""
    x, x_ref = _flat(x), _flat(x_ref)
    if x.shape != x_ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {x_ref.shape}")
    return np.sqrt(np.mean((np.asarray(x, np.float64) - np.asarray(x_ref, np.float64)) ** 2,
                           axis=1))


def mode_flips(gmm: GaussianMixture, x, x_ref) -> float:
    """Fraction of samples whose most responsible component differs from that of the
    reference sample with the same x_T (an ODE trajectory that switched modes)."""
    return float(np.mean(mode_assignments(gmm, x) != mode_assignments(gmm, x_ref)))


def convergence_order(nfe: Sequence[float], errors: Sequence[float]) -> float:
    """Empirical order p in error ~ C NFE^(-p): minus the least-squares slope of
    log(error) against log(NFE)."""
    nfe, errors = np.asarray(nfe, np.float64), np.asarray(errors, np.float64)
    if nfe.shape != errors.shape or nfe.size < 2:
        raise ValueError(f"need >= 2 matching (nfe, error) pairs, got {nfe.size} and "
                         f"{errors.size}")
    if np.any(errors <= 0) or np.any(nfe <= 0):
        raise ValueError("errors and NFE must be positive to fit a log-log slope")
    return float(-np.polyfit(np.log(nfe), np.log(errors), 1)[0])
