"""diffusion.paths: every Gaussian path's alpha, sigma, derivatives, log-SNR and its
inverse, the conversions between eps, x0, v and the flow velocity on each, and the
posterior of the forward process on a general path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import targets
from diffusion.forward_process import posterior_coefficients
from diffusion.paths import (CosineVP, FlowPath, LinearVP, VEPath, make_path, shift_time)
from diffusion.schedules import make_schedule

PATHS = {
    "table_linear": make_schedule("linear", 1000),
    "table_cosine": make_schedule("cosine", 1000),
    "cosine_vp": CosineVP(),
    "linear_vp": LinearVP(),
    "ve": VEPath(),
    "flow": FlowPath(),
}


def _times(path, n=37):
    return np.linspace(path.t_min, path.t_max, n)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_logsnr_and_time_round_trip(name):
    path = PATHS[name]
    t = _times(path)
    lam = path.host.logsnr(t)
    assert np.all(np.diff(lam) < 0), "logSNR must decrease in t"
    np.testing.assert_allclose(path.host.t_from_logsnr(lam), t, atol=1e-9)
    # float32 device view: the round trip to a few 1e-6 in t, and the same logSNR
    t32 = path.t_from_logsnr(path.logsnr(t))
    np.testing.assert_allclose(np.asarray(t32), t, atol=3e-5)
    np.testing.assert_allclose(np.asarray(path.logsnr(t)), lam, rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(np.asarray(path.alpha(t)), path.host.alpha(t), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(path.sigma(t)), path.host.sigma(t), rtol=1e-5,
                               atol=1e-6)
    s_ve = path.host.ve_sigma(t)
    np.testing.assert_allclose(path.host.t_from_ve_sigma(s_ve), t, atol=1e-9)
    np.testing.assert_allclose(path.host.alpha_from_ve_sigma(s_ve), path.host.alpha(t),
                               rtol=1e-9)
    # clean data at t = 0
    assert float(path.host.sigma(0.0)) == 0.0 and float(path.host.alpha(0.0)) == 1.0


@pytest.mark.parametrize("name", sorted(PATHS))
def test_derivatives_are_the_time_derivatives(name):
    path = PATHS[name]
    if name.startswith("table"):
        # piecewise linear log alpha_bar: differentiate inside grid intervals only
        t = (np.arange(3, 990, 41) + 0.5) / 1000.0
        h = 1e-5
    else:
        t, h = _times(path)[1:-1], 1e-6
    host = path.host
    for f, df, df32 in ((host.alpha, host.d_alpha, path.d_alpha),
                        (host.sigma, host.d_sigma, path.d_sigma)):
        fd = (f(t + h) - f(t - h)) / (2 * h)
        np.testing.assert_allclose(df(t), fd, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(df32(t)), df(t), rtol=2e-4, atol=2e-5)


def test_instances_have_their_closed_forms():
    t = np.linspace(0.0, 1.0, 11)
    flow = PATHS["flow"]
    np.testing.assert_allclose(flow.host.alpha(t), 1 - t)
    np.testing.assert_allclose(flow.host.sigma(t), t)
    ve = PATHS["ve"]
    np.testing.assert_allclose(ve.host.sigma(t), 80.0 * t)
    assert ve.t_min == pytest.approx(0.002 / 80.0)
    for name in ("table_linear", "table_cosine", "cosine_vp", "linear_vp"):
        p = PATHS[name]
        np.testing.assert_allclose(p.host.alpha(t) ** 2 + p.host.sigma(t) ** 2, 1.0,
                                   atol=1e-12)
        assert p.start_std(0.3) == 1.0
    # the continuous cosine and linear paths are the limits of the tables
    np.testing.assert_allclose(PATHS["cosine_vp"].host.alpha(t[:-1]),
                               PATHS["table_cosine"].host.alpha(t[:-1]), atol=2e-3)
    np.testing.assert_allclose(PATHS["linear_vp"].host.alpha(t),
                               PATHS["table_linear"].host.alpha(t), atol=2e-3)
    assert flow.start_std(1.0) == pytest.approx(1.0)
    assert float(ve.start_std(1.0)) == pytest.approx(np.sqrt(1 + 80.0 ** 2))


def test_the_table_view_is_the_samplers_interpolation():
    """The discrete code stays what it was: host values from the table's
    piecewise-linear log alpha_bar in float64, device values in float32."""
    sched = PATHS["table_linear"]
    t = np.array([0.0, 0.0005, 0.001, 0.2345, 1.0])
    grid = np.concatenate([[1.0], sched.alpha_bar_table])
    log_ab = np.interp(t, np.arange(1001) / 1000.0, np.log(grid))
    np.testing.assert_array_equal(sched.host.alpha(t), np.exp(0.5 * log_ab))
    np.testing.assert_array_equal(np.asarray(sched.alpha(t)),
                                  np.asarray(jnp.exp(0.5 * sched.log_alpha_bar(t))))
    assert sched.t_min == 1.0 / 1000 and sched.t_max == 1.0


def _pairs(path, t):
    b = t.shape[0]
    x0 = jax.random.normal(jax.random.key(0), (b, 3))
    eps = jax.random.normal(jax.random.key(1), (b, 3))
    col = lambda a: jnp.asarray(a, jnp.float32)[:, None]  # noqa: E731
    coefs = dict(alpha=col(path.host.alpha(t)), sigma=col(path.host.sigma(t)),
                 d_alpha=col(path.host.d_alpha(t)), d_sigma=col(path.host.d_sigma(t)))
    x_t = coefs["alpha"] * x0 + coefs["sigma"] * eps
    return x0, eps, x_t, coefs


@pytest.mark.parametrize("name", sorted(PATHS))
def test_targets_round_trip_on_every_path(name):
    path = PATHS[name]
    t = _times(path, 9)[1:-1]
    x0, eps, x_t, c = _pairs(path, t)
    vp = path.variance_preserving
    for kind in targets.PRED_TYPES:
        pred = targets.target(kind, x0, eps, c["alpha"], c["sigma"], c["d_alpha"],
                              c["d_sigma"])
        x0_back, eps_back = targets.to_x0_eps(kind, pred, x_t, c["alpha"], c["sigma"],
                                              c["d_alpha"], c["d_sigma"], vp=vp)
        scale = 1.0 + float(np.max(path.host.sigma(t)))  # VE: sigma up to 80
        np.testing.assert_allclose(np.asarray(x0_back), np.asarray(x0), atol=3e-5 * scale)
        np.testing.assert_allclose(np.asarray(eps_back), np.asarray(eps), atol=3e-5 * scale)
        for other in targets.PRED_TYPES:
            there = targets.convert(pred, kind, other, x_t, c["alpha"], c["sigma"],
                                    c["d_alpha"], c["d_sigma"], vp=vp)
            back = targets.convert(there, other, kind, x_t, c["alpha"], c["sigma"],
                                   c["d_alpha"], c["d_sigma"], vp=vp)
            np.testing.assert_allclose(np.asarray(back), np.asarray(pred),
                                       rtol=1e-4, atol=1e-4 * scale)


def test_flow_velocity_is_eps_minus_x0_and_converts_at_both_ends():
    path = PATHS["flow"]
    t = np.array([0.0, 0.3, 1.0])
    x0, eps, x_t, c = _pairs(path, t)
    u = targets.target("flow", x0, eps, c["alpha"], c["sigma"], c["d_alpha"], c["d_sigma"])
    np.testing.assert_allclose(np.asarray(u), np.asarray(eps - x0), atol=1e-6)
    x0_b, eps_b = targets.to_x0_eps("flow", u, x_t, c["alpha"], c["sigma"], c["d_alpha"],
                                    c["d_sigma"])
    np.testing.assert_allclose(np.asarray(x0_b), np.asarray(x0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(eps_b), np.asarray(eps), atol=1e-5)
    with pytest.raises(ValueError, match="d_alpha and d_sigma"):
        targets.target("flow", x0, eps, c["alpha"], c["sigma"])


@pytest.mark.parametrize("name", sorted(PATHS))
def test_posterior_of_the_forward_process_on_every_path(name):
    """q(x_s | x_t, x0) from the path's Markov transition equals Gaussian conditioning of
    the joint of (x_s, x_t) given x0."""
    path = PATHS[name]
    s, t = np.array([0.2, 0.5, 0.0]), np.array([0.6, 0.9, 0.4])
    c_x0, c_xt, var = (np.asarray(a, np.float64) for a in posterior_coefficients(path, s, t))
    a_s, sg_s = path.host.alpha(s), path.host.sigma(s)
    a_t, sg_t = path.host.alpha(t), path.host.sigma(t)
    # x_s = a_s x0 + sg_s e; x_t = a_t x0 + sg_t e'; cov(x_s, x_t | x0) = sg_s^2 a_t / a_s.
    cov = sg_s ** 2 * a_t / a_s
    np.testing.assert_allclose(c_xt, cov / sg_t ** 2, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(c_x0, a_s - c_xt * a_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, sg_s ** 2 - cov ** 2 / sg_t ** 2, rtol=1e-4, atol=1e-5)


def test_flow_path_from_t_one_has_a_defined_posterior():
    c_x0, c_xt, var = posterior_coefficients(PATHS["flow"], jnp.float32(0.5), jnp.float32(1.0))
    np.testing.assert_allclose([float(c_x0), float(c_xt), float(var)], [0.5, 0.0, 0.25],
                               atol=1e-6)


def test_shift_and_bad_input():
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(shift_time(t, 1.0), t)
    s3 = shift_time(t, 3.0)
    assert s3[0] == 0.0 and s3[-1] == 1.0 and np.all(s3[1:-1] > t[1:-1])
    np.testing.assert_allclose(s3, 3 * t / (1 + 2 * t))
    with pytest.raises(ValueError, match="shift"):
        shift_time(t, 0.0)
    with pytest.raises(ValueError, match="unknown Gaussian path"):
        make_path("nope")
    with pytest.raises(ValueError, match="sigma_min"):
        VEPath(sigma_max=1.0, sigma_min=2.0)
    assert isinstance(make_path("flow"), FlowPath)
