"""Per-image reconstruction metrics: PSNR and SSIM, for images [B, H, W, C].

Both take `data_range`, the span of pixel values: 2.0 for the project's [-1, 1]
images, 1.0 for [0, 1], 255.0 for uint8 scale. The arithmetic is dm_pix's; these
wrappers add the project's `data_range` convention and checks of the shapes.

dm_pix's SSIM equals the hand-written one it replaced (Gaussian window over the 'valid'
region, population variances, the map averaged over positions and channels) to 3e-7
on random images. Where an image is flat (locally constant), E[x^2] - mu^2 is float32
rounding noise in both; dm_pix clips it to a valid variance (and the covariance to
Cauchy-Schwarz), so there the two differed by ~1e-5, about their own error.
"""
from __future__ import annotations

import dm_pix
import jax.numpy as jnp


def _check(name: str, x: jnp.ndarray, y: jnp.ndarray) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"{name} expects two [B, H, W, C] arrays of one shape, got "
                         f"{x.shape} and {y.shape}")


def psnr(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 2.0) -> jnp.ndarray:
    """Peak signal-to-noise ratio in dB per image: 10 log10(range^2 / MSE). -> [B]."""
    _check("psnr", x, y)
    mse = dm_pix.mse(x.astype(jnp.float32), y.astype(jnp.float32))
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def ssim(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jnp.ndarray:
    """Structural similarity (Wang et al. 2004) per image -> [B].

    Local statistics come from a Gaussian window (11 taps, sigma 1.5) over the 'valid'
    region (no padding), with population (not sample) variances; the SSIM map is
    averaged over positions and channels. Matches scikit-image's
    `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
    """
    _check("ssim", x, y)
    h, w = x.shape[1:3]
    if h < window_size or w < window_size:
        raise ValueError(f"ssim window {window_size} is larger than image size {h}x{w}")
    return dm_pix.ssim(x.astype(jnp.float32), y.astype(jnp.float32), max_val=data_range,
                       filter_size=window_size, filter_sigma=sigma, k1=k1, k2=k2)
