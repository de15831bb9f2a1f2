"""Schedules, forward process, targets and losses against closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import forward_process as fp
from diffusion import learned_variance, losses, targets
from diffusion.schedules import make_schedule


def test_linear_schedule_matches_ddpm():
    s = make_schedule("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-10)
    np.testing.assert_allclose(s.alpha_bar_table, np.cumprod(1 - betas), rtol=1e-12)
    # DDPM's final alpha_bar is about 4.04e-5.
    assert abs(s.alpha_bar_table[-1] - 4.04e-5) < 1e-6


def test_cosine_schedule_closed_form_and_clipping():
    s = make_schedule("cosine", 1000)
    f = lambda t: np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    i = np.arange(900)  # before the 0.999 clip matters
    np.testing.assert_allclose(s.alpha_bar_table[i], f((i + 1) / 1000) / f(0), rtol=1e-9)
    assert s.betas.max() <= 0.999 + 1e-12


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_continuous_view_agrees_with_discrete(name):
    s = make_schedule(name, 200)
    i = np.arange(200)
    ab = np.asarray(s.alpha_bar(s.t_of_index(i)))
    np.testing.assert_allclose(ab, s.alpha_bar_table, rtol=2e-5, atol=1e-7)
    assert float(s.alpha_bar(0.0)) == 1.0
    t = jnp.linspace(0.01, 1.0, 57)
    np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, rtol=1e-5)
    lam = s.logsnr(t)
    np.testing.assert_allclose(lam, jnp.log(s.alpha(t) ** 2 / s.sigma(t) ** 2), rtol=1e-4,
                               atol=1e-4)
    assert np.all(np.diff(np.asarray(lam)) < 0), "logsnr must decrease in t"
    np.testing.assert_allclose(s.t_from_logsnr(lam), t, atol=2e-5)
    np.testing.assert_allclose(s.t_from_ve_sigma(s.sigma(t) / s.alpha(t)), t, atol=2e-5)


def test_zero_terminal_snr():
    s = make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    base = make_schedule("scaled_linear", 1000)
    # Rescaled to SNR 0, then floored at 2^-24 as diffusers does, so that sigma / alpha
    # stays finite at t = 1 (Karras grids, DPM-Solver's lambda).
    assert s.alpha_bar_table[-1] == 2.0 ** -24
    assert s.alpha_bar_table[-2] > 2.0 ** -24
    assert s.alpha_bar_table[0] == pytest.approx(base.alpha_bar_table[0], rel=1e-12)
    assert np.all(np.diff(s.alpha_bar_table) < 0)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="cosin"):
        make_schedule("cosin")


def test_q_sample_statistics():
    s = make_schedule("linear", 1000)
    x0 = jnp.full((20000, 1), 0.7)
    t = jnp.full((20000,), s.t_of_index(300))
    eps = jax.random.normal(jax.random.key(0), x0.shape)
    x_t = fp.q_sample(s, x0, t, eps)
    ab = s.alpha_bar_table[300]
    assert float(x_t.mean()) == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert float(x_t.var()) == pytest.approx(1 - ab, rel=0.03)


def test_q_step_composes_to_q_sample_distribution():
    # Running q(x_i | x_{i-1}) for i = 0..k gives the variance of q(x_k | x0).
    s = make_schedule("linear", 100)
    x = jnp.zeros((20000, 1))
    key = jax.random.key(1)
    for i in range(40):
        x = fp.q_step(s, x, i, jax.random.normal(jax.random.fold_in(key, i), x.shape))
    assert float(x.var()) == pytest.approx(1 - s.alpha_bar_table[39], rel=0.03)


def test_posterior_matches_bayes_for_one_step():
    # For s = t - 1/T the posterior equals DDPM's tilde-beta and mean coefficients.
    s = make_schedule("linear", 1000)
    i = 500
    ab, ab_prev, beta = s.alpha_bar_table[i], s.alpha_bar_table[i - 1], s.betas[i]
    c_x0, c_xt, var = fp.posterior_coefficients(s, s.t_of_index(i - 1), s.t_of_index(i))
    assert float(c_x0) == pytest.approx(math.sqrt(ab_prev) * beta / (1 - ab), rel=1e-4)
    assert float(c_xt) == pytest.approx(math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab), rel=1e-4)
    assert float(var) == pytest.approx((1 - ab_prev) / (1 - ab) * beta, rel=1e-3)
    # The step to clean data has zero variance; the clipped log-variance stays finite.
    lv = fp.posterior_log_variance_clipped(s, jnp.float32(0.0), s.t_of_index(0))
    assert np.isfinite(float(lv))


@pytest.mark.parametrize("src", targets.PRED_TYPES)
@pytest.mark.parametrize("dst", targets.PRED_TYPES)
def test_target_conversions_round_trip(src, dst):
    key = jax.random.key(2)
    x0, eps = jax.random.normal(key, (2, 4, 4, 3)), jax.random.normal(jax.random.key(3), (2, 4, 4, 3))
    alpha, sigma = 0.6, 0.8
    d = dict(d_alpha=-0.8, d_sigma=0.6)  # a VP path (cos, sin) at this point, unit speed
    x_t = alpha * x0 + sigma * eps
    pred = targets.target(src, x0, eps, alpha, sigma, **d)
    np.testing.assert_allclose(targets.convert(pred, src, dst, x_t, alpha, sigma, **d),
                               targets.target(dst, x0, eps, alpha, sigma, **d), atol=1e-5)


def test_loss_weightings():
    lam = jnp.array([-4.0, 0.0, 3.0])
    snr = jnp.exp(lam)
    np.testing.assert_allclose(losses.loss_weight("simple", "v", lam), 1.0)
    np.testing.assert_allclose(losses.loss_weight("snr", "eps", lam), 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses.loss_weight("snr", "x0", lam), snr, rtol=1e-6)
    np.testing.assert_allclose(losses.loss_weight("min_snr", "eps", lam, gamma=5.0),
                               jnp.minimum(snr, 5.0) / snr, rtol=1e-6)
    np.testing.assert_allclose(losses.loss_weight("min_snr", "v", lam, gamma=5.0),
                               jnp.minimum(snr, 5.0) / (snr + 1), rtol=1e-6)
    np.testing.assert_allclose(losses.loss_weight("truncated_snr", "x0", lam),
                               jnp.maximum(snr, 1.0), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        losses.loss_weight("snrr", "eps", lam)


@pytest.mark.parametrize("method", losses.TIME_SAMPLINGS)
def test_time_sampling_is_uniform_on_the_grid(method):
    s = make_schedule("linear", 10)
    t = losses.sample_time(jax.random.key(4), 20000, s, method)
    i = np.round(np.asarray(t) * 10 - 1).astype(int)
    np.testing.assert_allclose(np.asarray(t), (i + 1) / 10, atol=1e-6)
    counts = np.bincount(i, minlength=10) / 20000
    np.testing.assert_allclose(counts, 0.1, atol=0.015)
    tc = losses.sample_time(jax.random.key(4), 20000, s, method, discrete=False)
    assert float(tc.min()) > 0 and float(tc.max()) <= 1 and abs(float(tc.mean()) - 0.5) < 0.01


def test_diffusion_loss_is_zero_for_the_exact_target_and_positive_otherwise():
    # With x0 fixed at 0, x_t = sigma eps, so eps = x_t / sigma exactly.
    s = make_schedule("cosine", 1000)
    x0 = jnp.zeros((16, 4, 4, 1))
    def exact(x_t, c_noise):
        t = (c_noise + 1.0) / s.T
        return x_t / fp.expand(s.sigma(t), x_t)
    loss, t = losses.diffusion_loss(exact, s, x0, jax.random.key(5))
    assert float(jnp.max(loss)) < 1e-8
    loss_bad, _ = losses.diffusion_loss(lambda x, c: 0.5 * exact(x, c), s, x0, jax.random.key(5))
    assert float(jnp.mean(loss_bad)) > 0.1


def test_learned_variance_vlb_is_minimised_by_the_true_variance():
    # With the true x0 as mean, the KL term vanishes when the log-variance equals the
    # posterior's: v = -1 selects the posterior variance exactly.
    s = make_schedule("linear", 1000)
    key = jax.random.key(6)
    x0 = jax.random.uniform(key, (4, 4, 4, 1), minval=-1, maxval=1)
    t = jnp.full((4,), s.t_of_index(3))  # early, where beta and the posterior var differ
    x_t = fp.q_sample(s, x0, t, jax.random.normal(key, x0.shape))
    at_post = learned_variance.vlb_term(s, x0, x_t, t, x0, -jnp.ones_like(x0))
    away = learned_variance.vlb_term(s, x0, x_t, t, x0, jnp.ones_like(x0))
    assert float(jnp.max(jnp.abs(at_post))) < 1e-5
    assert float(jnp.min(away)) > 1e-3


def test_bucket_means():
    v = jnp.array([1.0, 2.0, 3.0, 10.0])
    t = jnp.array([0.1, 0.2, 0.6, 0.99])
    np.testing.assert_allclose(losses.bucket_means(v, t, 4), [1.5, 0.0, 3.0, 10.0])
