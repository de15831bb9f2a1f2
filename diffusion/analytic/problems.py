"""Named benchmark mixtures: a small 2-D one and an image-sized one, fixed by a seed.

    problem = make_problem("gmm_image")      # problem.gmm, problem.data_shape (32, 32, 3)

gmm2d: 8 anisotropic components on a ring of radius 0.75, unequal weights (1 to 4),
    full 2x2 covariances (std 0.12 along the ring, 0.03 across it), labels k % 4.
gmm_image: 10 components in D = 32*32*3 = 3072, one per label 0..9, weights 1 to 2;
    smooth random mean images in (-0.6, 0.6) and Sigma_k = U_k U_k^T + 0.05^2 I with
    U_k [3072, 8] smooth random directions (per-pixel std about 0.25).
gaussian2d: one anisotropic 2-D Gaussian, where the flow map is exact.
smooth2d: two wide, overlapping 2-D components (stds 0.3 to 0.5): a smooth ODE on which
    samplers show their asymptotic convergence orders at moderate NFE.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.analytic.gmm import GaussianMixture, from_covariances, from_low_rank


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    name: str
    gmm: GaussianMixture
    data_shape: tuple  # per-sample shape, prod = gmm.dim


def _rotated_cov(angle: float, std_along: float, std_across: float) -> np.ndarray:
    r = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return r @ np.diag([std_along ** 2, std_across ** 2]) @ r.T


def gmm2d(seed: int = 0) -> Problem:
    del seed  # fixed layout
    k = 8
    angles = 2 * math.pi * np.arange(k) / k
    means = 0.75 * np.stack([np.cos(angles), np.sin(angles)], 1)
    # Elongated along the ring (tangent direction angle + pi/2).
    covs = np.stack([_rotated_cov(a + math.pi / 2, 0.12, 0.03) for a in angles])
    weights = 1.0 + 3.0 * np.arange(k) / (k - 1)
    return Problem("gmm2d", from_covariances(weights, means, covs, labels=np.arange(k) % 4),
                   (2,))


def gaussian2d(seed: int = 0) -> Problem:
    del seed
    cov = _rotated_cov(0.3, 0.5, 0.1)
    return Problem("gaussian2d", from_covariances([1.0], [[0.2, -0.1]], cov[None]), (2,))


def smooth2d(seed: int = 0) -> Problem:
    del seed
    covs = [[[0.25, 0.05], [0.05, 0.16]], [[0.09, -0.03], [-0.03, 0.2]]]
    gmm = from_covariances([0.4, 0.6], [[-0.5, 0.2], [0.4, -0.3]], covs)
    return Problem("smooth2d", gmm, (2,))


def _smooth_fields(rng: np.random.Generator, n: int, coarse: int, shape: tuple) -> np.ndarray:
    """[n, H*W*C] random fields: coarse Gaussian noise upsampled bilinearly."""
    h, w, c = shape
    z = rng.standard_normal((n, coarse, coarse, c)).astype(np.float32)
    up = jax.image.resize(jnp.asarray(z), (n, h, w, c), method="bilinear")
    return np.asarray(up, np.float64).reshape(n, h * w * c)


def gmm_image(seed: int = 0, image_shape: tuple = (32, 32, 3), num_components: int = 10,
              rank: int = 8, iso_std: float = 0.05) -> Problem:
    rng = np.random.default_rng(seed)
    d = int(np.prod(image_shape))
    means = 0.6 * np.tanh(1.5 * _smooth_fields(rng, num_components, 4, image_shape))
    dirs = _smooth_fields(rng, num_components * rank, 8, image_shape)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    # Decaying spectrum, scaled so the low-rank part has per-pixel variance 0.25^2.
    scales = 0.8 ** np.arange(rank)
    scales *= math.sqrt(0.25 ** 2 * d / np.sum(scales ** 2))
    factors = (dirs.reshape(num_components, rank, d) * scales[None, :, None]).transpose(0, 2, 1)
    weights = np.linspace(1.0, 2.0, num_components)
    gmm = from_low_rank(weights, means, factors, iso_std, labels=np.arange(num_components))
    return Problem("gmm_image", gmm, tuple(image_shape))


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "gmm2d": gmm2d,
    "gmm_image": gmm_image,
    "gaussian2d": gaussian2d,
    "smooth2d": smooth2d,
}


def make_problem(name: str, seed: int = 0) -> Problem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown analytic problem {name!r}; known: {sorted(PROBLEMS)}")
    return PROBLEMS[name](seed)
