"""Does a sample follow its prompt? Shares and means with 95% intervals, in numpy.

For the Fashion-MNIST text-to-image demo: the class a prompt names is checked with the
project's classifier (`compute_features(classifier_features(...), samples)["probs"]`,
whose argmax is the predicted class), its tone and size with the same pixel measures
that wrote the training captions (`diffusion.data.captions.measure_attributes`).

    probs = compute_features(classifier_features(DEFAULT_WEIGHTS), samples)["probs"]
    acc = class_share(probs, label=7)                     # Share(value, lo, hi, n)
    tone = attribute_summary(samples, label=7)            # brightness, share_light, ...
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from diffusion.data import captions

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


class Share(NamedTuple):
    """A proportion or mean over n samples and its 95% interval [lo, hi]."""
    value: float
    lo: float
    hi: float
    n: int


def wilson_share(successes: int, n: int, z: float = Z_95) -> Share:
    """successes / n with Wilson's score interval (stays inside [0, 1] and is not
    empty at 0 or n, unlike the normal approximation)."""
    if n <= 0:
        raise ValueError(f"a share needs n > 0 samples, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside [0, {n}]")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Share(p, max(0.0, center - half), min(1.0, center + half), n)


def mean_interval(values: np.ndarray, z: float = Z_95) -> Share:
    """The mean of `values` [n] with mean +- z standard errors."""
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("a mean needs at least one value")
    mean = float(values.mean())
    se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    return Share(mean, mean - z * se, mean + z * se, int(values.size))


def class_share(probs: np.ndarray, label: int) -> Share:
    """Share of samples whose most probable class is `label`. probs: [N, K] class
    probabilities (or logits: only the argmax is used), or predicted classes [N]."""
    probs = np.asarray(probs)
    predicted = probs.argmax(axis=-1) if probs.ndim == 2 else probs
    if predicted.ndim != 1:
        raise ValueError(f"expected probs [N, K] or classes [N], got shape {probs.shape}")
    return wilson_share(int(np.sum(predicted == label)), len(predicted))


class AttributeSummary(NamedTuple):
    """brightness: mean foreground level in [0, 1]; area: mean foreground share;
    light / large: shares above the class's training medians (the caption's words)."""
    brightness: Share
    area: Share
    light: Share
    large: Share


def attribute_summary(images: np.ndarray, label: int,
                      thresholds: captions.AttributeThresholds = captions.FASHION_MNIST_THRESHOLDS,
                      value_range: tuple[float, float] = (-1, 1)) -> AttributeSummary:
    """Tone and size of samples [N, H, W, C] meant to show class `label` (value_range:
    (-1, 1) for model outputs, (0, 255) for uint8 images)."""
    brightness, area = captions.measure_attributes(images, value_range)
    light = brightness > thresholds.brightness[label]
    large = area > thresholds.area[label]
    n = len(brightness)
    return AttributeSummary(mean_interval(brightness), mean_interval(area),
                            wilson_share(int(light.sum()), n), wilson_share(int(large.sum()), n))
