"""Sampling options that act on the denoiser: dynamic thresholding (Saharia et al. 2022).

Static clipping of x0 to [-c, c] is `Denoiser(clip_x0=c)`. Dynamic thresholding instead
takes, per sample, s = max(1, the p-quantile of |x0|) and uses x0 = clip(x0, -s, s) / s,
which pulls saturated pixels in without flattening the whole image (it matters most
at large guidance weights). eps is recomputed from the new x0, so every sampler (eps or
x0 form) sees one consistent prediction.

    denoiser = with_dynamic_thresholding(denoiser, 0.995)
    x0 = get_sampler("dpmpp_2m")(denoiser, key, shape, 20, ...)
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from diffusion.denoiser import Prediction
from diffusion.forward_process import expand


def dynamic_threshold(x0: jnp.ndarray, percentile: float) -> jnp.ndarray:
    """x0 [B, ...] -> clip(x0, -s, s) / s with s = max(1, quantile(|x0_b|, percentile))."""
    b = x0.shape[0]
    s = jnp.quantile(jnp.abs(x0).reshape(b, -1), percentile, axis=1)
    s = expand(jnp.maximum(s, 1.0), x0)
    return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True, eq=False)
class ThresholdedDenoiser:
    """A Denoiser whose x0 is dynamically thresholded; other attributes are the inner one's."""
    denoiser: object
    percentile: float

    def __getattr__(self, name):
        # Only called for attributes not found on the wrapper (schedule, pred_type, ...).
        if name == "denoiser":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def predict(self, x_t: jnp.ndarray, t, y=None, guidance=None) -> Prediction:
        pred = self.denoiser.predict(x_t, t, y, guidance)
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        alpha = expand(self.denoiser.schedule.alpha(t), x_t)
        sigma = expand(self.denoiser.schedule.sigma(t), x_t)
        x0 = dynamic_threshold(pred.x0, self.percentile)
        return Prediction(x0, (x_t - alpha * x0) / sigma, pred.var_out)


def with_dynamic_thresholding(denoiser, percentile: float = 0.995) -> ThresholdedDenoiser:
    """Wraps a Denoiser; percentile p in (0, 1] (Imagen: 0.995, the 99.5th percentile)."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic-thresholding percentile must be in (0, 1] (e.g. 0.995 "
                         f"for the 99.5th percentile), got {percentile}")
    return ThresholdedDenoiser(denoiser, float(percentile))
