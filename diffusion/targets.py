"""Prediction targets eps, x0 and v (Salimans & Ho 2022), and conversions between them.

With x_t = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1:
v = alpha eps - sigma x0, x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v.
alpha and sigma are broadcast against x_t (shape [B, 1, 1, 1] or scalars).
"""
from __future__ import annotations

import jax.numpy as jnp

PRED_TYPES = ("eps", "x0", "v")


def check_pred_type(pred_type: str) -> str:
    if pred_type not in PRED_TYPES:
        raise ValueError(f"unknown prediction type {pred_type!r}; known: {PRED_TYPES}")
    return pred_type


def target(pred_type: str, x0: jnp.ndarray, eps: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """The regression target of a network that predicts `pred_type`."""
    check_pred_type(pred_type)
    if pred_type == "eps":
        return eps
    if pred_type == "x0":
        return x0
    return alpha * eps - sigma * x0


def to_x0_eps(pred_type: str, pred: jnp.ndarray, x_t: jnp.ndarray, alpha, sigma):
    """Network output of type `pred_type` -> (x0, eps)."""
    check_pred_type(pred_type)
    if pred_type == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if pred_type == "x0":
        return pred, (x_t - alpha * pred) / sigma
    return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred


def convert(pred: jnp.ndarray, from_type: str, to_type: str, x_t: jnp.ndarray,
            alpha, sigma) -> jnp.ndarray:
    """Converts a prediction between any two of eps, x0, v at the same (x_t, t)."""
    x0, eps = to_x0_eps(from_type, pred, x_t, alpha, sigma)
    return target(to_type, x0, eps, alpha, sigma)
