"""Gaussian mixtures whose noised marginals, scores and posterior means are exact.

A mixture of K Gaussians in D dimensions, p(x0) = sum_k w_k N(x0; mu_k, Sigma_k), with
every covariance stored in eigen-form

    Sigma_k = Q_k diag(lam_k) Q_k^T + s2_k (I - Q_k Q_k^T),    Q_k [D, r] orthonormal.

r = D holds any full covariance (s2_k is then unused). r << D holds a low-rank-plus-
isotropic covariance U U^T + s^2 I: the Woodbury identity in eigen-form, so everything
below costs O(D r) per sample and per component, never D x D.

Under x_t = alpha x0 + sigma eps, component k of x_t is N(alpha mu_k, C_k) with
C_k = alpha^2 Sigma_k + sigma^2 I: the same eigenvectors, eigenvalues alpha^2 lam + sigma^2
and alpha^2 s2 + sigma^2. With d = x_t - alpha mu_k and responsibilities r_k(x_t):

    E[eps | x_t] = sum_k r_k sigma C_k^{-1} d,
    E[x0 | x_t]  = sum_k r_k (mu_k + alpha Sigma_k C_k^{-1} d),

both written without dividing by alpha or sigma, so they stay accurate at t -> 0 and
t -> 1. Components are folded in one at a time (an online softmax inside `lax.scan`), so
memory is O(B D) whatever K is. The functions are jitted with the mixture as a static
argument (hashed by identity), so each mixture compiles once per input shape.

Class-conditional mixtures give each component a label; a label y >= 0 keeps the
components with that label (weights renormalised), y < 0 (the null class) keeps all.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for log(0): an all-masked running max would otherwise give inf - inf.
_NEG = -1e30


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """weights [K], means [K, D], basis Q [K, D, r], eigvals lam [K, r], iso_var s2 [K],
    labels [K] int (or None for an unconditional mixture). Build with `from_covariances`
    or `from_low_rank`, which check and orthonormalise."""
    weights: np.ndarray
    means: np.ndarray
    basis: np.ndarray
    eigvals: np.ndarray
    iso_var: np.ndarray
    labels: Optional[np.ndarray] = None

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[2])

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def component(self, k: int) -> GaussianMixture:
        """Component k alone, as a one-component mixture (weight 1)."""
        sl = slice(k, k + 1)
        return GaussianMixture(np.ones(1), self.means[sl], self.basis[sl], self.eigvals[sl],
                               self.iso_var[sl], None)

    def covariance(self, k: int) -> np.ndarray:
        """Dense Sigma_k [D, D] (float64), for checks on small D."""
        q, lam, s2 = (np.asarray(a, np.float64) for a in
                      (self.basis[k], self.eigvals[k], self.iso_var[k]))
        return (q * lam) @ q.T + s2 * (np.eye(self.dim) - q @ q.T)

    def class_weights(self, y: int) -> np.ndarray:
        """True component weights [K] given label y (y < 0: the unconditional weights)."""
        w = np.asarray(self.weights, np.float64)
        if y >= 0:
            if self.labels is None:
                raise ValueError("this mixture has no labels; condition only with y < 0")
            if not np.any(self.labels == y):
                raise ValueError(f"no component has label {y}; labels: "
                                 f"{sorted(set(self.labels.tolist()))}")
            w = np.where(self.labels == y, w, 0.0)
        return w / w.sum()


def _check_weights_means(weights, means, labels):
    weights = np.asarray(weights, np.float64)
    means = np.asarray(means, np.float64)
    if means.ndim != 2:
        raise ValueError(f"means must be [K, D], got shape {means.shape}")
    if weights.shape != (means.shape[0],):
        raise ValueError(f"weights must be [K={means.shape[0]}], got shape {weights.shape}")
    if np.any(weights <= 0):
        raise ValueError("mixture weights must be positive")
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != weights.shape or np.any(labels < 0):
            raise ValueError(f"labels must be [K={weights.shape[0]}] non-negative ints, "
                             f"got {labels}")
    return weights / weights.sum(), means, labels


def from_covariances(weights, means, covs, labels=None) -> GaussianMixture:
    """Mixture with full covariances covs [K, D, D] (symmetric positive definite)."""
    weights, means, labels = _check_weights_means(weights, means, labels)
    covs = np.asarray(covs, np.float64)
    k, d = means.shape
    if covs.shape != (k, d, d):
        raise ValueError(f"covs must be [K={k}, D={d}, D={d}], got shape {covs.shape}")
    if not np.allclose(covs, np.swapaxes(covs, 1, 2), atol=1e-10):
        raise ValueError("covariances must be symmetric")
    lam, q = np.linalg.eigh(covs)
    if np.any(lam <= 0):
        raise ValueError(f"covariances must be positive definite; smallest eigenvalue "
                         f"{lam.min():.3g}")
    # r = D: the isotropic complement is empty; s2 = 1 keeps 0 / s2 finite.
    return GaussianMixture(weights, means, q, lam, np.ones(k), labels)


def from_low_rank(weights, means, factors, iso_std, labels=None) -> GaussianMixture:
    """Mixture with Sigma_k = U_k U_k^T + iso_std_k^2 I, factors U [K, D, r], r < D."""
    weights, means, labels = _check_weights_means(weights, means, labels)
    factors = np.asarray(factors, np.float64)
    k, d = means.shape
    if factors.ndim != 3 or factors.shape[:2] != (k, d) or factors.shape[2] >= d:
        raise ValueError(f"factors must be [K={k}, D={d}, r] with r < D, got {factors.shape}")
    iso_var = np.broadcast_to(np.asarray(iso_std, np.float64) ** 2, (k,)).copy()
    if np.any(iso_var <= 0):
        raise ValueError("iso_std must be positive (the covariance must be invertible)")
    # U = P S V^T, so U U^T = P S^2 P^T and Sigma = P diag(S^2 + s2) P^T + s2 (I - P P^T).
    p, s, _ = np.linalg.svd(factors, full_matrices=False)
    return GaussianMixture(weights, means, p, s ** 2 + iso_var[:, None], iso_var, labels)


def _stacked(gmm: GaussianMixture):
    """Per-component parameters as float32 device arrays, stacked on axis 0."""
    f = lambda a: jnp.asarray(a, jnp.float32)
    labels = np.zeros(gmm.num_components, np.int32) if gmm.labels is None else gmm.labels
    return (f(gmm.means), f(gmm.basis), f(gmm.eigvals), f(gmm.iso_var),
            f(np.log(gmm.weights)), jnp.asarray(labels, jnp.int32))


def _label_mask(labels_k, y, b):
    """[B] bool: component k is allowed for each sample."""
    if y is None:
        return jnp.ones((b,), bool)
    y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (b,))
    return (y < 0) | (y == labels_k)


def _check_inputs(gmm, x, y):
    if x.ndim != 2 or x.shape[1] != gmm.dim:
        raise ValueError(f"x must be [B, D={gmm.dim}], got shape {x.shape}")
    if y is not None and gmm.labels is None:
        raise ValueError("labels y were given but the mixture has no labels")


def _per_sample(a, b):
    return jnp.broadcast_to(jnp.asarray(a, jnp.float32), (b,))


def _component_terms(params_k, x, alpha, sigma):
    """Log density of component k of the noised marginal, and the pieces of C_k^{-1} d."""
    mu, q, lam, s2, logw, _ = params_k
    d = x - alpha[:, None] * mu                          # [B, D]
    v = d @ q                                            # [B, r]
    perp = d - v @ q.T                                   # [B, D]
    ev = alpha[:, None] ** 2 * lam + sigma[:, None] ** 2  # [B, r]
    iso = alpha ** 2 * s2 + sigma ** 2                   # [B]
    dim, r = x.shape[1], q.shape[1]
    maha = jnp.sum(v * v / ev, -1) + jnp.sum(perp * perp, -1) / iso
    logdet = jnp.sum(jnp.log(ev), -1) + (dim - r) * jnp.log(iso)
    logp = logw - 0.5 * (maha + logdet + dim * math.log(2 * math.pi))
    return logp, v, perp, ev, iso


@functools.partial(jax.jit, static_argnames=("gmm",))
def component_log_probs(gmm: GaussianMixture, x: jnp.ndarray, alpha=1.0, sigma=0.0,
                        y=None) -> jnp.ndarray:
    """[B, K]: log w_k + log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I), -inf where the
    label y excludes component k. x [B, D]; alpha, sigma scalars or [B]."""
    _check_inputs(gmm, x, y)
    b = x.shape[0]
    alpha, sigma = _per_sample(alpha, b), _per_sample(sigma, b)

    def body(_, params_k):
        logp = _component_terms(params_k, x, alpha, sigma)[0]
        return None, jnp.where(_label_mask(params_k[5], y, b), logp, -jnp.inf)

    _, logp = jax.lax.scan(body, None, _stacked(gmm))
    return logp.T


def log_prob(gmm: GaussianMixture, x: jnp.ndarray, alpha=1.0, sigma=0.0,
             y=None) -> jnp.ndarray:
    """[B]: log density of the noised marginal (alpha=1, sigma=0: the data density; with
    y >= 0 the class-conditional density, weights renormalised within the class)."""
    lp = component_log_probs(gmm, x, alpha, sigma, y)
    if y is not None:  # renormalise the weights the label keeps
        b = x.shape[0]
        labels = jnp.asarray(gmm.labels, jnp.int32)
        keep = jax.vmap(lambda l: _label_mask(l, y, b), out_axes=1)(labels)  # [B, K]
        logw = jnp.log(jnp.asarray(gmm.weights, jnp.float32))
        lp = lp - jax.nn.logsumexp(jnp.where(keep, logw, -jnp.inf), axis=1, keepdims=True)
    return jax.nn.logsumexp(lp, axis=1)


def responsibilities(gmm: GaussianMixture, x: jnp.ndarray, alpha=1.0, sigma=0.0,
                     y=None) -> jnp.ndarray:
    """[B, K]: p(component k | x_t) (and y)."""
    return jax.nn.softmax(component_log_probs(gmm, x, alpha, sigma, y), axis=1)


@functools.partial(jax.jit, static_argnames=("gmm",))
def posterior(gmm: GaussianMixture, x_t: jnp.ndarray, alpha, sigma,
              y=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(E[x0 | x_t], E[eps | x_t]), each [B, D], for x_t = alpha x0 + sigma eps.

    alpha, sigma: scalars or [B]; y: int [B] labels or None (negative = unconditional).
    Any alpha > 0, sigma >= 0 works, so VE coordinates (alpha = 1) are fine too.
    """
    _check_inputs(gmm, x_t, y)
    b, dim = x_t.shape
    alpha, sigma = _per_sample(alpha, b), _per_sample(sigma, b)

    def body(carry, params_k):
        m, s, acc_x0, acc_eps = carry
        logp, v, perp, ev, iso = _component_terms(params_k, x_t, alpha, sigma)
        mu, q, lam, s2 = params_k[:4]
        logp = jnp.where(_label_mask(params_k[5], y, b), logp, -jnp.inf)
        # C^{-1} d and Sigma C^{-1} d in the eigenbasis of component k.
        cinv_d = (v / ev) @ q.T + perp / iso[:, None]
        sig_cinv_d = (v * lam / ev) @ q.T + perp * (s2 / iso)[:, None]
        x0_k = mu + alpha[:, None] * sig_cinv_d
        eps_k = sigma[:, None] * cinv_d
        m_new = jnp.maximum(m, logp)
        scale, p = jnp.exp(m - m_new), jnp.exp(logp - m_new)
        carry = (m_new, s * scale + p, acc_x0 * scale[:, None] + p[:, None] * x0_k,
                 acc_eps * scale[:, None] + p[:, None] * eps_k)
        return carry, None

    init = (jnp.full((b,), _NEG), jnp.zeros((b,)), jnp.zeros((b, dim)), jnp.zeros((b, dim)))
    (_, s, acc_x0, acc_eps), _ = jax.lax.scan(body, init, _stacked(gmm))
    return acc_x0 / s[:, None], acc_eps / s[:, None]


def score(gmm: GaussianMixture, x_t: jnp.ndarray, alpha, sigma, y=None) -> jnp.ndarray:
    """grad_x log p_t(x_t) = -E[eps | x_t] / sigma, [B, D] (needs sigma > 0)."""
    _, eps = posterior(gmm, x_t, alpha, sigma, y)
    b = x_t.shape[0]
    return -eps / _per_sample(sigma, b)[:, None]


@functools.partial(jax.jit, static_argnames=("gmm", "n"))
def sample(gmm: GaussianMixture, key: jax.Array, n: int,
           y=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(x0 [n, D], component index [n]) drawn from the mixture (given labels y [n])."""
    k_comp, k_z, k_w = jax.random.split(key, 3)
    logw = jnp.broadcast_to(jnp.log(jnp.asarray(gmm.weights, jnp.float32)),
                            (n, gmm.num_components))
    if y is not None:
        if gmm.labels is None:
            raise ValueError("labels y were given but the mixture has no labels")
        y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (n,))
        labels = jnp.asarray(gmm.labels, jnp.int32)
        keep = (y[:, None] < 0) | (y[:, None] == labels[None, :])
        logw = jnp.where(keep, logw, -jnp.inf)
    comp = jax.random.categorical(k_comp, logw, axis=1)
    z = jax.random.normal(k_z, (n, gmm.dim))
    w = jax.random.normal(k_w, (n, gmm.rank))

    # One component at a time keeps memory at O(n D) instead of gathering [n, D, r].
    def body(x, inp):
        k, (mu, q, lam, s2, _, _) = inp
        z_perp = z - (z @ q) @ q.T
        x_k = mu + (w * jnp.sqrt(lam)) @ q.T + jnp.sqrt(s2) * z_perp
        return jnp.where((comp == k)[:, None], x_k, x), None

    x, _ = jax.lax.scan(body, jnp.zeros((n, gmm.dim)),
                        (jnp.arange(gmm.num_components), _stacked(gmm)))
    return x, comp
