"""Library functions that replaced hand-written code give the hand-written results:
optax's tree norm and Polyak average (train step, EMA); dm_pix's PSNR/SSIM; the benchmark plots are
matplotlib's."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion.train_state import ema_decay, ema_update


def _tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)),
                     "bias": jax.random.normal(k2, (4,))},
            "dense": jax.random.normal(k3, (5, 7))}


def test_tree_norm_equals_hand_written_global_norm():
    g = _tree(jax.random.key(0))
    hand = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(optax.tree.norm(g)), hand, rtol=1e-6)


def test_ema_update_is_polyak_average_with_warmup_decay():
    ema, params = _tree(jax.random.key(1)), _tree(jax.random.key(2))
    for step, warmup in ((0, True), (5, True), (10_000, True), (3, False)):
        decay = ema_decay(jnp.asarray(step, jnp.int32), 0.999, warmup)
        want = (1 + step) / (10 + step) if warmup else 0.999
        np.testing.assert_allclose(float(decay), min(0.999, want), rtol=1e-6)
        out = ema_update(ema, params, decay)
        jax.tree.map(lambda o, e, p: np.testing.assert_allclose(
            o, float(decay) * e + (1 - float(decay)) * p, rtol=1e-5, atol=1e-6), out, ema, params)


# ---- sampler benchmark plots: matplotlib (Agg) --------------------------------------

def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_benchmark_plot_writes_a_png(tmp_path):
    from experiments.sampler_benchmark import report
    rows = [dict(sampler=s, nfe=n, target_nfe=n, fid=f, sw=float("nan") if n == 5 else f / 9)
            for s, k in (("ddim", 1.0), ("heun", 0.5)) for n, f in ((5, 40 * k), (10, 20 * k),
                                                                     (20, 9 * k))]
    path = tmp_path / "fid.png"
    report.plot(str(path), rows, [("fid", "FID vs NFE", True), ("sw", "sliced W2", False)],
                references={"fid": {"reference (1000 steps)": 3.0}}, title="tiny")
    assert _is_png(path) and path.stat().st_size > 5000
    # Nothing to draw: no file, no error (as before).
    report.plot(str(tmp_path / "none.png"), rows, [("missing", "x", False)])
    assert not (tmp_path / "none.png").exists()


def test_replot_redraws_a_shipped_result(tmp_path):
    import shutil
    from experiments.sampler_benchmark import run
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "sampler_benchmark", "gmm2d", "results.csv")
    shutil.copy(src, tmp_path / "results.csv")
    run.main(["run", "--replot", str(tmp_path)])
    assert _is_png(tmp_path / "metrics.png")


# ---- PSNR / SSIM: dm_pix ------------------------------------------------------------

def _ssim_float64(x, y, data_range, size=11, sigma=1.5):
    """The hand-written SSIM that dm_pix replaced, in float64 numpy: separable Gaussian
    window over the 'valid' region, population variances, mean over positions and C."""
    r = np.arange(size) - (size - 1) / 2
    w = np.exp(-0.5 * (r / sigma) ** 2)
    w /= w.sum()

    def blur(a):  # [B, H, W, C] -> valid region
        a = np.apply_along_axis(lambda v: np.convolve(v, w, "valid"), 1, a)
        return np.apply_along_axis(lambda v: np.convolve(v, w, "valid"), 2, a)

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.reshape(len(s), -1).mean(axis=1)


def test_ssim_and_psnr_match_the_hand_written_definitions():
    from diffusion.autoencoder.metrics import psnr, ssim
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.uniform(k1, (3, 24, 20, 3), minval=-1, maxval=1)
    noisy = jnp.clip(x + 0.2 * jax.random.normal(k2, x.shape), -1, 1)
    other = jax.random.uniform(k3, x.shape, minval=-1, maxval=1)
    for y in (noisy, other, x):
        np.testing.assert_allclose(ssim(x, y), _ssim_float64(x, y, 2.0), atol=1e-5)
        u, v = (x + 1) / 2, (y + 1) / 2
        np.testing.assert_allclose(ssim(u, v, data_range=1.0), _ssim_float64(u, v, 1.0),
                                   atol=1e-5)
    small = ssim(x[:, :7, :7], noisy[:, :7, :7], window_size=7)
    np.testing.assert_allclose(small, _ssim_float64(x[:, :7, :7], noisy[:, :7, :7], 2.0, 7),
                               atol=1e-5)
    mse = np.mean((np.asarray(x, np.float64) - np.asarray(noisy)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(psnr(x, noisy), 10 * np.log10(4 / mse), rtol=1e-5)


def test_ssim_closed_form_of_flat_images():
    """Constant images a, b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    Small values: the float32 rounding of E[x^2] - mu^2 (zero here) grows with x^2."""
    from diffusion.autoencoder.metrics import psnr, ssim
    a, b = 0.02, 0.06
    x, y = jnp.full((1, 16, 16, 2), a), jnp.full((1, 16, 16, 2), b)
    c1 = (0.01 * 1.0) ** 2
    np.testing.assert_allclose(ssim(x, y, data_range=1.0),
                               (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-5)
    np.testing.assert_allclose(psnr(x, y, data_range=1.0), 10 * np.log10(1 / 0.04 ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="window 11 is larger than image size 8x8"):
        ssim(x[:, :8, :8], y[:, :8, :8])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        psnr(x[0], y[0])
