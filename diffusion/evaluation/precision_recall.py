"""Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

Each feature set is approximated by the union of balls around its points, the radius of
a point's ball being the distance to its k-th nearest neighbour within its own set.
Precision is the fraction of generated points inside the real manifold, recall the
fraction of real points inside the generated manifold.

Distances are computed in JAX, one block of rows at a time against the whole other set,
as squared Euclidean distances |a|^2 + |b|^2 - 2 a.b (clamped at 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """Squared distances [n, m] between rows of a [n, D] and b [m, D]."""
    aa = jnp.sum(a * a, axis=1)[:, None]
    bb = jnp.sum(b * b, axis=1)[None, :]
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(aa + bb - 2.0 * ab, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_sq_dist_block(block: jax.Array, points: jax.Array, k: int) -> jax.Array:
    # k + 1 smallest: the point itself (distance 0) is among the block's neighbours.
    neg_smallest, _ = jax.lax.top_k(-_sq_dists(block, points), k + 1)
    return -neg_smallest[:, k]


@jax.jit
def _covered_block(block: jax.Array, centres: jax.Array, sq_radii: jax.Array) -> jax.Array:
    return jnp.any(_sq_dists(block, centres) <= sq_radii[None, :], axis=1)


def _row_blocks(x: np.ndarray, block_size: int):
    """Yields (padded block [block_size, D], number of valid rows) so shapes stay fixed."""
    n = x.shape[0]
    for start in range(0, n, block_size):
        block = x[start:start + block_size]
        valid = block.shape[0]
        if valid < block_size:
            block = np.concatenate([block, np.zeros((block_size - valid, x.shape[1]), x.dtype)])
        yield block, valid


def knn_sq_radii(features: np.ndarray, k: int = 3, block_size: int = 1024) -> np.ndarray:
    """Squared distance [N] from each row of features [N, D] to its k-th nearest neighbour."""
    f = np.asarray(features, np.float32)
    if f.shape[0] <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} points, got {f.shape[0]}")
    points = jnp.asarray(f)
    block_size = min(block_size, f.shape[0])
    out = [np.asarray(_kth_sq_dist_block(jnp.asarray(b), points, k))[:valid]
           for b, valid in _row_blocks(f, block_size)]
    return np.concatenate(out)


def manifold_coverage(queries: np.ndarray, centres: np.ndarray, sq_radii: np.ndarray,
                      block_size: int = 1024) -> float:
    """Fraction of queries [N, D] inside at least one ball (centres [M, D], sq_radii [M])."""
    q = np.asarray(queries, np.float32)
    c = jnp.asarray(np.asarray(centres, np.float32))
    r = jnp.asarray(np.asarray(sq_radii, np.float32))
    block_size = min(block_size, q.shape[0])
    covered = [np.asarray(_covered_block(jnp.asarray(b), c, r))[:valid]
               for b, valid in _row_blocks(q, block_size)]
    return float(np.concatenate(covered).mean())


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     block_size: int = 1024) -> tuple[float, float]:
    """(precision, recall) of fake [N, D] against real [M, D] features, k-NN radii."""
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need [N, D] feature sets of equal D, got {real.shape} and {fake.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real_r = knn_sq_radii(real, k, block_size)
    fake_r = knn_sq_radii(fake, k, block_size)
    precision = manifold_coverage(fake, real, real_r, block_size)
    recall = manifold_coverage(real, fake, fake_r, block_size)
    return precision, recall
