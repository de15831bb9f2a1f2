"""Prediction targets eps, x0, v (Salimans & Ho 2022) and the flow velocity u, and
conversions between them.

With x_t = alpha x0 + sigma eps on any Gaussian path (`diffusion.paths`):
- v = alpha eps - sigma x0; on a variance-preserving path (alpha^2 + sigma^2 = 1)
  x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v; elsewhere both are divided by
  alpha^2 + sigma^2 (pass vp=False);
- "flow": u = d_alpha x0 + d_sigma eps = dx_t / dt along the conditional path (u = eps -
  x0 on the linear path alpha = 1 - t, sigma = t), and back, with
  det = alpha d_sigma - sigma d_alpha (> 0 on every path whose SNR decreases):
  x0 = (d_sigma x_t - sigma u) / det, eps = (alpha u - d_alpha x_t) / det. These divide
  by neither alpha nor sigma, so a velocity model converts at t = 0 and t = 1 alike.
alpha, sigma, d_alpha, d_sigma are broadcast against x_t (shape [B, 1, 1, 1] or scalars).
"""
from __future__ import annotations

import jax.numpy as jnp

PRED_TYPES = ("eps", "x0", "v", "flow")


def check_pred_type(pred_type: str) -> str:
    if pred_type not in PRED_TYPES:
        raise ValueError(f"unknown prediction type {pred_type!r}; known: {PRED_TYPES}")
    return pred_type


def _need_derivatives(d_alpha, d_sigma) -> None:
    if d_alpha is None or d_sigma is None:
        raise ValueError("the flow velocity needs the path's d_alpha and d_sigma")


def velocity(x0: jnp.ndarray, eps: jnp.ndarray, d_alpha, d_sigma) -> jnp.ndarray:
    """u = d_alpha x0 + d_sigma eps: the probability-flow velocity dx/dt when x0, eps are
    the posterior means at (x_t, t)."""
    return d_alpha * x0 + d_sigma * eps


def target(pred_type: str, x0: jnp.ndarray, eps: jnp.ndarray, alpha, sigma,
           d_alpha=None, d_sigma=None) -> jnp.ndarray:
    """The regression target of a network that predicts `pred_type` ("flow" needs the
    path's d_alpha, d_sigma)."""
    check_pred_type(pred_type)
    if pred_type == "eps":
        return eps
    if pred_type == "x0":
        return x0
    if pred_type == "flow":
        _need_derivatives(d_alpha, d_sigma)
        return velocity(x0, eps, d_alpha, d_sigma)
    return alpha * eps - sigma * x0


def to_x0_eps(pred_type: str, pred: jnp.ndarray, x_t: jnp.ndarray, alpha, sigma,
              d_alpha=None, d_sigma=None, vp: bool = True):
    """Network output of type `pred_type` -> (x0, eps). vp=False: alpha^2 + sigma^2 may
    differ from 1 (matters for "v" only)."""
    check_pred_type(pred_type)
    if pred_type == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if pred_type == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if pred_type == "flow":
        _need_derivatives(d_alpha, d_sigma)
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x_t - sigma * pred) / det, (alpha * pred - d_alpha * x_t) / det
    x0, eps = alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    if not vp:
        norm = alpha ** 2 + sigma ** 2
        x0, eps = x0 / norm, eps / norm
    return x0, eps


def convert(pred: jnp.ndarray, from_type: str, to_type: str, x_t: jnp.ndarray,
            alpha, sigma, d_alpha=None, d_sigma=None, vp: bool = True) -> jnp.ndarray:
    """Converts a prediction between any two of eps, x0, v, flow at the same (x_t, t)."""
    x0, eps = to_x0_eps(from_type, pred, x_t, alpha, sigma, d_alpha, d_sigma, vp)
    return target(to_type, x0, eps, alpha, sigma, d_alpha, d_sigma)
