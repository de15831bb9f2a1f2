"""Flow matching: the velocity loss is minimal at the exact velocity of a Gaussian
mixture, the time samplers have their densities, the shift is SD3's, the weights mean
what losses.py's x0-space weights mean, and a tiny flow run trains, checkpoints and
samples with flow_euler, ddim and dpmpp_2m through diffusion.load."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

import diffusion
from diffusion import flow_matching as fm
from diffusion import losses
from diffusion.analytic.exact import exact_velocity
from diffusion.analytic.gmm import sample as gmm_sample
from diffusion.analytic.problems import make_problem
from diffusion.paths import CosineVP, FlowPath, shift_time

FLOW = FlowPath()


# ---- the loss is minimal at the exact velocity ----------------------------------------

def _loss_of_perturbed(path, weighting, n=8192):
    """L(delta) for the model u* + delta h, on one fixed draw of (x0, t, eps)."""
    gmm = make_problem("smooth2d").gmm
    x0, _ = gmm_sample(gmm, jax.random.key(0), n)

    def loss(delta):
        def net_fn(x_t, c_noise):
            t = path.t_from_c_noise(c_noise)
            return exact_velocity(gmm, path, x_t, t) + delta * jnp.tanh(x_t) * (1.0 + t[:, None])
        per, _ = fm.flow_matching_loss(net_fn, path, x0, jax.random.key(1),
                                       time_sampling="logit_normal", weighting=weighting)
        return jnp.mean(per)
    return loss


@pytest.mark.parametrize("path,weighting", [(FLOW, "simple"), (FLOW, "min_snr"),
                                            (FLOW, "snr"), (CosineVP(), "min_snr")],
                         ids=["flow-simple", "flow-min_snr", "flow-snr", "cosine-min_snr"])
def test_exact_velocity_is_the_minimum_of_the_flow_loss(path, weighting):
    loss = jax.jit(_loss_of_perturbed(path, weighting))
    l0, lp, lm = float(loss(0.0)), float(loss(0.2)), float(loss(-0.2))
    assert l0 < lp and l0 < lm
    # L is quadratic in delta: its minimiser on this draw is -L'(0) / L''(0), ~0 up to
    # Monte-Carlo noise; a biased target or weight moves it by O(1).
    grad = float(jax.grad(loss)(0.0))
    curv = (lp + lm - 2.0 * l0) / 0.2 ** 2
    assert curv > 0
    assert abs(grad / curv) < 0.03, (grad, curv)


def test_a_wrong_target_is_not_the_minimum():
    """The same check fails for a velocity of the wrong sign convention (x0 - eps)."""
    gmm = make_problem("smooth2d").gmm
    x0, _ = gmm_sample(gmm, jax.random.key(0), 4096)

    def loss(delta):
        def net_fn(x_t, c_noise):
            t = FLOW.t_from_c_noise(c_noise)
            return -exact_velocity(gmm, FLOW, x_t, t) + delta * x_t
        return jnp.mean(fm.flow_matching_loss(net_fn, FLOW, x0, jax.random.key(1))[0])
    assert abs(float(jax.grad(loss)(0.0))) > 0.1


# ---- weights in x0-space ---------------------------------------------------------------

@pytest.mark.parametrize("path", [FLOW, CosineVP()], ids=["flow", "cosine_vp"])
def test_velocity_error_is_the_x0_error_times_det_over_sigma(path):
    """At fixed x_t, ||u - u_hat||^2 = (det / sigma)^2 ||x0 - x0_hat||^2 (docstring)."""
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    t = jnp.array([0.1, 0.4, 0.8])
    x0, eps, dx = (jax.random.normal(k, (3, 5)) for k in (k1, k2, k3))
    a, s = path.alpha(t)[:, None], path.sigma(t)[:, None]
    da, ds = path.d_alpha(t)[:, None], path.d_sigma(t)[:, None]
    x_t = a * x0 + s * eps
    x0_hat = x0 + dx
    eps_hat = (x_t - a * x0_hat) / s
    du = (da * x0 + ds * eps) - (da * x0_hat + ds * eps_hat)
    np.testing.assert_allclose(np.sum(du ** 2, 1),
                               fm.velocity_x0_weight(path, t) * np.sum(dx ** 2, 1), rtol=1e-4)
    if path is FLOW:
        np.testing.assert_allclose(fm.velocity_x0_weight(FLOW, t), 1.0 / t ** 2, rtol=1e-5)


def test_weightings_are_the_x0_weights_of_losses_py():
    """loss_weight x (det / sigma)^2 is the x0-space weight: the same as a v-model's
    losses.loss_weight x (snr + 1), for each weighting."""
    t = jnp.linspace(0.02, 0.98, 9)
    snr = jnp.exp(FLOW.logsnr(t))
    implicit = fm.velocity_x0_weight(FLOW, t)
    for name in ("snr", "min_snr", "truncated_snr"):
        w_flow = fm.loss_weight(name, FLOW, t, gamma=5.0) * implicit
        w_v = losses.loss_weight(name, "v", FLOW.logsnr(t), gamma=5.0) * (snr + 1.0)
        np.testing.assert_allclose(w_flow, w_v, rtol=1e-4)
    np.testing.assert_allclose(fm.loss_weight("simple", FLOW, t), 1.0)
    # finite at t = 0 and t = 1
    assert np.all(np.isfinite(fm.loss_weight("truncated_snr", FLOW, jnp.array([0.0, 1.0]))))
    with pytest.raises(ValueError, match="unknown flow loss weighting 'snrr'"):
        fm.loss_weight("snrr", FLOW, t)


# ---- time sampling ---------------------------------------------------------------------

def _mode_cdf(t, s):
    """P(T <= t) = 1 - f_mode^-1(t) (f_mode decreasing), f_mode^-1 by bisection."""
    lo, hi = np.zeros_like(t), np.ones_like(t)
    f = lambda u: 1 - u - s * (np.cos(np.pi * u / 2) ** 2 - 1 + u)  # noqa: E731
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        above = f(mid) > t
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 1.0 - 0.5 * (lo + hi)


def _draw(method, n=20000, **kw):
    return np.asarray(fm.sample_time(jax.random.key(7), n, method, **kw), np.float64)


def test_logit_normal_times_have_their_density():
    t = _draw("logit_normal", location=0.5, scale=0.8)
    cdf = lambda x: stats.norm.cdf((special.logit(x) - 0.5) / 0.8)  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert stats.kstest(t, lambda x: stats.norm.cdf(special.logit(x))).pvalue < 1e-6
    assert stats.kstest(_draw("uniform"), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("s", [1.29, -0.5])
def test_mode_times_have_their_density(s):
    t = _draw("mode", mode_scale=s)
    assert stats.kstest(t, lambda x: _mode_cdf(x, s)).pvalue > 1e-3
    assert stats.kstest(t, "uniform").pvalue < 1e-6  # the test can tell it from uniform
    assert abs(t.mean() - 0.5) < 0.01  # E f_mode(u) = 1/2 for every s


def test_bad_time_sampling_settings_are_errors():
    with pytest.raises(ValueError, match="mode_scale in"):
        fm.sample_time(jax.random.key(0), 4, "mode", mode_scale=2.0)
    with pytest.raises(ValueError, match="unknown flow time sampling 'lognormal'"):
        fm.sample_time(jax.random.key(0), 4, "lognormal")
    with pytest.raises(ValueError, match="shift must be > 0"):
        fm.sample_time(jax.random.key(0), 4, "uniform", shift=0.0)


def test_shift_is_sd3s_and_moves_the_logit_by_log_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = np.linspace(1, 1000, 1000)[::-1] / 1000
    np.testing.assert_allclose(shift_time(unshifted, 3.0), sched.sigmas.numpy(),
                               rtol=1e-5)
    # the same draws, shifted; a shifted logit-normal is the logit-normal at m + log(s)
    t = _draw("logit_normal", location=0.2)
    ts = _draw("logit_normal", location=0.2, shift=3.0)
    np.testing.assert_allclose(ts, shift_time(t, 3.0), rtol=1e-5)
    np.testing.assert_allclose(special.logit(ts), special.logit(t) + math.log(3.0),
                               atol=2e-3)
    cdf = lambda x: stats.norm.cdf(special.logit(x) - 0.2 - math.log(3.0))  # noqa: E731
    assert stats.kstest(ts, cdf).pvalue > 1e-3


# ---- a tiny flow run -------------------------------------------------------------------

def test_tiny_flow_run_trains_checkpoints_and_samples_with_any_sampler(tmp_path):
    from configs.flow_fashion_mnist import get_config
    from diffusion.train import loop
    cfg = get_config("runlocal")
    cfg.train.sample_every = 0
    wd = str(tmp_path / "flow")
    final = loop.train_and_evaluate(cfg, wd)
    assert final["step"] == 4 and np.isfinite(final["loss"])
    pipe = diffusion.load(wd)
    assert pipe.step == 4 and pipe.config.train.objective == "flow"
    d = pipe.denoiser
    assert d.pred_type == "flow" and isinstance(d.schedule, FlowPath) and d.schedule.T == 1000
    for sampler in ("flow_euler", "ddim", "dpmpp_2m"):
        x = pipe.sample(sampler, steps=2, num=3)
        assert x.shape == (3, 8, 8, 3) and np.all(np.isfinite(x)), sampler
    _reflow_of(pipe, wd, tmp_path)


def _reflow_of(pipe, flow_wd, tmp_path):
    """The pairs tool on the tiny flow run, then a tiny reflow run started from it."""
    from configs.reflow_fashion_mnist import get_config
    from diffusion import reflow_pairs
    from diffusion.train import loop
    from diffusion.train.setup import build_run
    out = str(tmp_path / "pairs.npy")
    reflow_pairs.main(["prog", f"--workdir={flow_wd}", f"--out={out}", "--num=5",
                       "--steps=1", "--sampler=flow_euler", "--chunk=3"])
    pairs = np.load(out)
    assert pairs.shape == (5, 2, 8, 8, 3)
    # One Euler step from t = 1 lands on the model's (clipped) x0 at x_1 = eps: each
    # pair's sample is the denoiser's x0 at its own noise, so the noise is the start.
    d = pipe.denoiser
    x0 = jax.jit(lambda e: d.predict(e, 1.0).x0)(jnp.asarray(pairs[:, 1]))
    np.testing.assert_allclose(pairs[:, 0], np.asarray(x0), atol=1e-5)
    assert not np.allclose(pairs[0, 1], pairs[3, 1])  # chunk 1 has its own seed

    cfg = get_config("runlocal")
    cfg.data.source = f"pairs:{out}"
    cfg.flow.init_workdir = flow_wd
    cfg.train.update(num_steps=2, checkpoint_every=2, sample_every=0)
    wd = str(tmp_path / "reflow")
    run = build_run(cfg, wd)
    state, _ = loop.restore_or_init(run)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state.params, pipe.params)
    final = loop.train_and_evaluate(cfg, wd)
    assert final["step"] == 2 and np.isfinite(final["loss"])
    reflowed = diffusion.load(wd)
    assert reflowed.image_shape == (8, 8, 3)  # from the pairs file's header
    assert reflowed.sample("flow_euler", steps=1, num=2).shape == (2, 8, 8, 3)
