"""Inception Score (Salimans et al. 2016) from class probabilities.

IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over the split. As in
the reference code the samples are cut into `num_splits` equal parts and the mean and
standard deviation of the per-split scores are reported.
"""

from __future__ import annotations

import numpy as np
import scipy.special


def inception_score(probs: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """(mean, std) of IS over splits of probs [N, K] (rows are p(y|x), summing to 1)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, K], got shape {p.shape}")
    n = p.shape[0]
    if num_splits < 1 or n < num_splits:
        raise ValueError(f"cannot cut {n} samples into {num_splits} splits")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must be non-negative and sum to 1 (apply softmax first)")
    scores = []
    for part in np.array_split(p, num_splits):
        p_y = part.mean(axis=0, keepdims=True)
        # xlogy gives 0 for 0 * log 0, so one-hot predictions are handled exactly.
        kl = scipy.special.xlogy(part, part) - scipy.special.xlogy(part, p_y)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_logits(logits: np.ndarray,
                                num_splits: int = 10) -> tuple[float, float]:
    """IS from unnormalised logits [N, K]."""
    logits = np.asarray(logits, np.float64)
    return inception_score(scipy.special.softmax(logits, axis=-1), num_splits)
