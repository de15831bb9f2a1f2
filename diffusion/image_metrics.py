"""Per-image reconstruction metrics: PSNR and SSIM, for images [B, H, W, C].

Both take `data_range`, the span of pixel values: 2.0 for the project's [-1, 1]
images, 1.0 for [0, 1], 255.0 for uint8 scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 2.0) -> jnp.ndarray:
    """Peak signal-to-noise ratio in dB per image: 10 log10(range^2 / MSE). -> [B]."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"psnr expects two [B, H, W, C] arrays of one shape, got "
                         f"{x.shape} and {y.shape}")
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> jnp.ndarray:
    """Normalised 1-D Gaussian taps [size]."""
    r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    w = jnp.exp(-0.5 * jnp.square(r / sigma))
    return w / w.sum()


def _blur_valid(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    # Separable Gaussian filter per channel, 'valid' region only: [N, H, W, 1].
    k = w.shape[0]
    x = jax.lax.conv_general_dilated(x, w.reshape(k, 1, 1, 1), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.lax.conv_general_dilated(x, w.reshape(1, k, 1, 1), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def ssim(x: jnp.ndarray, y: jnp.ndarray, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jnp.ndarray:
    """Structural similarity (Wang et al. 2004) per image -> [B].

    Local statistics come from a Gaussian window (11 taps, sigma 1.5) over the 'valid'
    region (no padding), with population (not sample) variances; the SSIM map is
    averaged over positions and channels. Matches scikit-image's
    `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim expects two [B, H, W, C] arrays of one shape, got "
                         f"{x.shape} and {y.shape}")
    b, h, w, c = x.shape
    if h < window_size or w < window_size:
        raise ValueError(f"ssim window {window_size} is larger than image size {h}x{w}")
    # Channels become batch entries so one single-channel filter serves them all.
    to_planes = lambda a: a.astype(jnp.float32).transpose(0, 3, 1, 2).reshape(b * c, h, w, 1)
    x, y = to_planes(x), to_planes(y)
    win = gaussian_window(window_size, sigma)
    mu_x, mu_y = _blur_valid(x, win), _blur_valid(y, win)
    var_x = _blur_valid(x * x, win) - mu_x ** 2
    var_y = _blur_valid(y * y, win) - mu_y ** 2
    cov = _blur_valid(x * y, win) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
        ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.reshape(b, -1).mean(axis=1)
