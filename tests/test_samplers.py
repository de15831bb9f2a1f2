"""Samplers on exact denoisers of Gaussian mixtures: no networks, every number checkable.

Data: a 2-D mixture of two isotropic Gaussians, weights 0.3 / 0.7, std 0.25. Its
denoiser E[x0 | x_t] is closed-form. Label y = k keeps component k (a Gaussian: each
coordinate a 1-D Gaussian N(mu_k, 0.25^2)), y < 0 the whole mixture, so one compiled
sampler serves both the Gaussian and the mixture checks, and classifier-free guidance
is exact as well. Consistency sampling gets the exact consistency function: the
probability-flow ODE integrated (RK4 in log sigma) from the query point to sigma_min.
ODE solvers are compared with a float64 RK4 solution of the same ODE (numpy).

Compiles are the cost on CPU (about a second each): one per sampler for the statistics;
the batch-size / guidance checks run for DDPM (its own loop) and for euler_a, which
draws noise inside `plan.run_plan`'s loop: every other sampler shares one of the two
loops, their noise handling and the Denoiser's CFG. DDIM's convergence is that of
dpm_solver_1 (the same update on another grid) and is not repeated.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.denoiser import Denoiser
from diffusion.schedules import make_schedule
from diffusion.samplers import SAMPLERS, canonical_name, get_sampler, grids, nfe
from diffusion.samplers.base import time_pairs
from diffusion.samplers.dpm_solver import plan_multistep
from diffusion.samplers.karras import plan_karras
from diffusion.samplers.options import dynamic_threshold, with_dynamic_thresholding

SCHED = make_schedule("linear", T=1000)
WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-1.0, -0.5], [1.0, 0.5]])
STD = 0.25
B = 4096  # first half y = 0 (the Gaussian), second half y = -1 (the mixture)
Y_BIG = jnp.concatenate([jnp.zeros(B // 2, jnp.int32), -jnp.ones(B // 2, jnp.int32)])
K = 64    # small batch for the batch-size / guidance checks
CALLS = [0]  # network calls made, counted at run time




# ---- exact models --------------------------------------------------------------------
def posterior_x0(x, log_ab, y):
    """E[x0 | x_t = x] [B, D] at log alpha_bar [B]; y [B] selects a component (< 0: all)."""
    a = jnp.exp(0.5 * log_ab)[:, None, None]
    var = a ** 2 * STD ** 2 - jnp.expm1(log_ab)[:, None, None]       # [B, 1, 1]
    d = x[:, None, :] - a * MEANS[None]                                 # [B, K, D]
    logp = (jnp.log(WEIGHTS)[None] - 0.5 * jnp.sum(d ** 2, -1) / var[..., 0]
            - 0.5 * x.shape[-1] * jnp.log(var[..., 0]))
    if y is not None:
        keep = (y[:, None] < 0) | (y[:, None] == jnp.arange(len(WEIGHTS))[None])
        logp = jnp.where(keep, logp, -1e30)
    r = jax.nn.softmax(logp, axis=-1)
    return jnp.sum(r[..., None] * (MEANS[None] + a * STD ** 2 / var * d), axis=1)


def _count():
    CALLS[0] += 1


_LOG_AB = np.log(np.concatenate([[1.0], SCHED.alpha_bar_table]))


def _log_alpha_bar(c_noise):
    """The Schedule's piecewise-linear log alpha_bar at t = (c_noise + 1) / T; the grid is
    uniform, so a gather replaces jnp.interp's search (cheaper to compile)."""
    u = jnp.clip(c_noise + 1.0, 0.0, SCHED.T)
    i = jnp.minimum(jnp.floor(u).astype(jnp.int32), SCHED.T - 1)
    table = jnp.asarray(_LOG_AB, jnp.float32)
    return table[i] + (u - i) * (table[i + 1] - table[i])


def _gmm_net(x, c_noise, y):
    jax.debug.callback(_count)
    return posterior_x0(x, _log_alpha_bar(c_noise), y)


SIGMA_MIN_SCHED = float(grids.ve_sigma(SCHED, 1.0 / SCHED.T))


def _consistency_net(x, c_noise, y, steps: int = 32):
    """Exact consistency function: x_ve(sigma) -> x_ve(sigma_min) along the PF-ODE."""
    jax.debug.callback(_count)
    log_ab = _log_alpha_bar(c_noise)
    x_ve = x * jnp.exp(-0.5 * log_ab)[:, None]
    log_sig = 0.5 * (jnp.log(-jnp.expm1(log_ab)) - log_ab)
    h = (math.log(SIGMA_MIN_SCHED) - log_sig)[:, None] / steps

    def f(u, x_ve):  # dx_ve / dlog sigma = x_ve - D(x_ve, sigma)
        lab = -jnp.log1p(jnp.exp(2.0 * u))
        return x_ve - posterior_x0(x_ve * jnp.exp(0.5 * lab)[:, None], lab, y)

    def rk4(i, x_ve):
        u = log_sig + i * h[:, 0]
        k1 = f(u, x_ve)
        k2 = f(u + 0.5 * h[:, 0], x_ve + 0.5 * h * k1)
        k3 = f(u + 0.5 * h[:, 0], x_ve + 0.5 * h * k2)
        k4 = f(u + h[:, 0], x_ve + h * k3)
        return x_ve + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return jax.lax.fori_loop(0, steps, rk4, x_ve)


DEN = Denoiser(_gmm_net, SCHED, pred_type="x0")
CM_DEN = Denoiser(_consistency_net, SCHED, pred_type="x0")


def np_posterior_x0(x, lam):
    """float64 numpy twin of posterior_x0 at half-logSNR lam (scalar), all components."""
    a2 = 1.0 / (1.0 + np.exp(-2.0 * lam))
    a, var = np.sqrt(a2), a2 * STD ** 2 + (1.0 - a2)
    d = x[:, None, :] - a * MEANS[None]
    logp = np.log(WEIGHTS)[None] - 0.5 * np.sum(d ** 2, -1) / var
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return np.sum(r[..., None] * (MEANS[None] + a * STD ** 2 / var * d), axis=1)


def reference_ode(x_T, t_end, n=500):
    """PF-ODE from t = 1 to t_end, float64 RK4 in lam on y = x / sigma:
    dy / dlam = e^lam x0_hat(sigma y, lam)."""
    l0, l1 = float(grids.lam(SCHED, 1.0)), float(grids.lam(SCHED, t_end))
    sig = lambda lam: math.sqrt(1.0 / (1.0 + math.exp(2.0 * lam)))
    f = lambda lam, y: math.exp(lam) * np_posterior_x0(sig(lam) * y, lam)
    y, h = x_T / sig(l0), (l1 - l0) / n
    for i in range(n):
        lam = l0 + i * h
        k1 = f(lam, y)
        k2 = f(lam + h / 2, y + h / 2 * k1)
        k3 = f(lam + h / 2, y + h / 2 * k2)
        k4 = f(lam + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y * sig(l1)


# ---- distributions, determinism, batch size, guidance, NFE ---------------------------
# (sampler, num_steps, options, std tolerance (relative), check batch size / guidance)
DIST_CASES = [
    ("ddpm", 200, {}, 0.10, True),           # ancestral: std 0.235 exactly at 200 steps
    ("ddim", 50, {}, 0.15, False),          # first order: biased low at 50 steps
    ("dpm_solver_1", 50, {}, 0.10, False),
    ("dpm_solver_2", 25, {}, 0.04, False),
    ("dpm_solver_3", 17, {}, 0.04, False),
    ("dpmpp_2s", 25, {}, 0.04, False),
    ("dpmpp_2m", 50, {}, 0.04, False),
    ("dpmpp_3m", 50, {}, 0.04, False),
    ("euler", 50, {}, 0.10, False),
    ("heun", 25, {"S_churn": 10.0}, 0.10, False),
    ("euler_a", 200, {}, 0.10, True),        # std 0.241 exactly at 200 steps
    ("plms", 49, {}, 0.04, False),
    ("consistency", 1, {}, 0.04, False),
    ("consistency", 3, {}, 0.04, False),
]


def _stats_ok(x, tol_std):
    """Gaussian half (component 0) and mixture half: means, stds, mode weights."""
    g, m = x[: B // 2], x[B // 2:]
    np.testing.assert_allclose(g.mean(0), MEANS[0], atol=0.03)
    np.testing.assert_allclose(g.std(0), STD, rtol=tol_std)
    lab = np.argmin(((m[:, None, :] - MEANS[None]) ** 2).sum(-1), axis=1)
    assert abs(lab.mean() - WEIGHTS[1]) < 0.04, lab.mean()
    for k in range(2):
        np.testing.assert_allclose(m[lab == k].mean(0), MEANS[k], atol=0.05)
        np.testing.assert_allclose(m[lab == k].std(0), STD, rtol=tol_std + 0.03)


@pytest.mark.parametrize("name,num_steps,options,tol_std,check_batch", DIST_CASES)
def test_distribution_determinism_batch_guidance(name, num_steps, options, tol_std,
                                                 check_batch):
    den = CM_DEN if name == "consistency" else DEN
    sample = get_sampler(name)
    big = jax.jit(lambda key: sample(den, key, (B, 2), num_steps, y=Y_BIG, **options))
    key = jax.random.key(7)
    CALLS[0] = 0
    x = np.asarray(big(key))
    assert CALLS[0] == nfe(name, num_steps, **options)
    _stats_ok(x, tol_std)
    if not check_batch:
        np.testing.assert_array_equal(np.asarray(big(key)), x)            # deterministic
        assert not np.allclose(np.asarray(big(jax.random.key(8))), x)     # and keyed
        return
    small = jax.jit(lambda key, offset, w: sample(
        den, key, (K, 2), num_steps, y=jnp.zeros(K, jnp.int32), guidance=w,
        sample_offset=offset, **options))
    # First K of the batch of B, at guidance 1 = the conditional model (y = 0 there).
    x_small = np.asarray(small(key, 0, 1.0))
    np.testing.assert_allclose(x_small, x[:K], atol=2e-4)
    np.testing.assert_array_equal(np.asarray(small(key, 0, 1.0)), x_small)
    assert not np.allclose(np.asarray(small(jax.random.key(8), 0, 1.0)), x_small)
    # Guidance 0 is the unconditional model: samples B/2.. of the big batch had y = -1.
    np.testing.assert_allclose(np.asarray(small(key, B // 2, 0.0)), x[B // 2: B // 2 + K],
                               atol=2e-4)


# ---- convergence of the ODE solvers --------------------------------------------------
X_T = np.random.default_rng(0).standard_normal((128, 2))


@pytest.fixture(scope="module")
def references():
    """x(1/T) of the PF-ODE from X_T, and D(x(1/T)), the answer of samplers that end
    with a step from t = 1/T to t = 0 (Karras' final Euler step, DDIM, PLMS)."""
    x = reference_ode(X_T, 1.0 / SCHED.T)
    return {"x": x, "D": np_posterior_x0(x, float(grids.lam(SCHED, 1.0 / SCHED.T)))}


# (sampler, options, N, which reference, expected order)
CONVERGENCE_CASES = [
    ("dpm_solver_1", {}, 20, "x", 1),
    ("dpm_solver_2", {}, 10, "x", 2),
    ("dpm_solver_3", {}, 8, "x", 3),
    ("dpmpp_2s", {}, 10, "x", 2),
    ("dpmpp_2m", {}, 20, "x", 2),
    ("dpmpp_3m", {}, 20, "x", 3),
    # The references start at t = 1: Karras grids must too (their default is sigma = 80).
    ("euler", {"sigma_max": 1e9}, 25, "D", 1),
    ("heun", {"sigma_max": 1e9}, 12, "D", 2),
    ("plms", {"spacing": "linspace"}, 20, "D", 3),
]


@pytest.mark.parametrize("name,options,n,ref,order", CONVERGENCE_CASES)
def test_ode_convergence_order(references, name, options, n, ref, order):
    sample = get_sampler(name)
    errs = []
    for steps in (n, 2 * n):
        run = jax.jit(lambda x_T: sample(DEN, jax.random.key(0), X_T.shape, steps,
                                         x_T=x_T, **options))
        x = np.asarray(run(jnp.asarray(X_T, jnp.float32)), np.float64)
        errs.append(np.linalg.norm(x - references[ref], axis=-1).mean())
    assert errs[0] / errs[1] > 2.0 ** (order - 0.5), errs


# ---- image-to-image ------------------------------------------------------------------
@pytest.mark.parametrize("name,num_steps", [("dpmpp_2m", 20), ("heun", 25)])
def test_img2img_keeps_the_data_distribution(name, num_steps):
    """x_init drawn from the data, noised to t_start, and solved back: the data again,
    with only the steps below t_start evaluated."""
    rng = np.random.default_rng(1)
    comp = np.concatenate([np.zeros(B // 2, int),
                           (rng.random(B // 2) < WEIGHTS[1]).astype(int)])
    x_init = MEANS[comp] + STD * rng.standard_normal((B, 2))
    sample = get_sampler(name)
    run = jax.jit(lambda key, x_init: sample(DEN, key, (B, 2), num_steps, y=Y_BIG,
                                             x_init=x_init, strength=0.3))
    CALLS[0] = 0
    x = np.asarray(run(jax.random.key(3), jnp.asarray(x_init, jnp.float32)))
    plan = {"dpmpp_2m": lambda: plan_multistep(SCHED, num_steps, order=2, strength=0.3),
            "heun": lambda: plan_karras(SCHED, num_steps, heun=True, strength=0.3)}[name]()
    assert CALLS[0] == plan.num_evals < nfe(name, num_steps)
    assert 0.2 < plan.t_start <= 0.3 and plan.t[0] == plan.t_start
    _stats_ok(x, 0.05)
    # The result still depends on x_init (sigma_ve(0.3) = 1.2 > the data's 0.25 wipes
    # most of it; independent samples would give a correlation of 0 +- 0.02).
    corr = np.corrcoef(x[: B // 2, 0], x_init[: B // 2, 0])[0, 1]
    assert corr > 0.15, corr


def test_img2img_argument_errors():
    sample = get_sampler("dpmpp_2m")
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="needs an initial image"):
        sample(DEN, jax.random.key(0), (4, 2), 10, strength=0.5)
    with pytest.raises(ValueError, match="not both"):
        sample(DEN, jax.random.key(0), (4, 2), 10, x_T=x, x_init=x, strength=0.5)
    with pytest.raises(ValueError, match="strength must be in"):
        sample(DEN, jax.random.key(0), (4, 2), 10, x_init=x, strength=1.5)
    with pytest.raises(ValueError, match="leaves no sampling step"):
        plan_multistep(SCHED, 10, order=2, strength=1e-4)
    # The shared DDPM / DDIM grid helper truncates the same way.
    t, s = time_pairs(SCHED, 10, "trailing", strength=0.35)
    np.testing.assert_allclose(np.asarray(t), [0.3, 0.2, 0.1], atol=1e-6)
    assert float(s[-1]) == 0.0
    with pytest.raises(ValueError, match="leaves no sampling step"):
        time_pairs(SCHED, 10, "trailing", strength=0.05)


# ---- dynamic thresholding ------------------------------------------------------------
def test_dynamic_thresholding():
    x0 = jnp.stack([jnp.linspace(-3.0, 3.0, 101), jnp.linspace(-0.5, 0.5, 101)])  # [2, 101]
    out = np.asarray(dynamic_threshold(x0, 0.9))
    s = np.quantile(np.abs(np.asarray(x0[0])), 0.9)       # 2.7 > 1: clipped and rescaled
    np.testing.assert_allclose(out[0], np.clip(np.asarray(x0[0]), -s, s) / s, rtol=1e-6)
    np.testing.assert_allclose(out[1], np.asarray(x0[1]), rtol=1e-6)  # inside [-1, 1]: kept
    # As a Denoiser: x0 thresholded, eps consistent with it, attributes passed through.
    big = Denoiser(lambda x, c, y: 3.0 * x, SCHED, pred_type="x0")
    wrapped = with_dynamic_thresholding(big, 0.995)
    assert wrapped.schedule is SCHED and wrapped.pred_type == "x0"
    x_t, t = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4), jnp.array([0.3, 0.3])
    pred = jax.jit(wrapped.predict)(x_t, t)
    assert float(jnp.abs(pred.x0).max()) <= 1.0 + 1e-6
    a, s_ = float(SCHED.alpha(0.3)), float(SCHED.sigma(0.3))
    np.testing.assert_allclose(np.asarray(a * pred.x0 + s_ * pred.eps), np.asarray(x_t),
                               atol=1e-5)
    with pytest.raises(ValueError, match="percentile"):
        with_dynamic_thresholding(big, 99.5)


# ---- host-side: grids, NFE counts, options -------------------------------------------
# Every registered sampler, with every option that changes its number of network calls.
NFE_CASES = [
    ("ddpm", {}), ("ddpm", {"spacing": "iddpm", "strength": 0.5}),
    ("ddim", {}), ("ddim", {"spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                            "prev_timestep": "stride"}),
    ("dpm_solver_1", {}), ("dpm_solver_2", {"denoise_to_zero": True}),
    ("dpm_solver_3", {"skip_type": "trailing"}), ("dpmpp_2s", {"strength": 0.5}),
    ("dpmpp_2m", {"denoise_to_zero": True}), ("dpmpp_2m", {"lower_order_final": False}),
    ("dpmpp_2m", {"skip_type": "leading", "steps_offset": 1, "strength": 0.5}),
    ("dpmpp_3m", {"skip_type": "karras", "final_step": "zero"}),
    ("euler", {"S_churn": 5.0}), ("euler", {"sigma_schedule": "timesteps", "spacing": "linspace",
                                            "fractional_timesteps": True}),
    ("heun", {}), ("heun", {"strength": 0.5}), ("euler_a", {}),
    ("plms", {}), ("pndm", {"warmup": "prk"}), ("plms", {"warmup": "lower_order"}),
    ("plms", {"set_alpha_to_one": False, "strength": 0.5}),
    ("consistency", {}), ("consistency", {"strength": 0.5}),
    ("flow_euler", {}), ("flow_euler", {"shift": 3.0, "strength": 0.8}),
    ("flow_midpoint", {}),
]


def _network_calls(fn, *args) -> int:
    """Network calls `fn` makes, read off its traced program (no compile): every call of
    the exact nets runs one debug callback, and a scan runs its body `length` times."""
    def count(jaxpr) -> int:
        n = 0
        for eqn in jaxpr.eqns:
            subs = [getattr(v, "jaxpr", v) for v in eqn.params.values()]  # Closed -> Jaxpr
            subs = [j for j in subs if hasattr(j, "eqns")]
            inner = sum(count(j) for j in subs)
            if eqn.primitive.name == "debug_callback":
                n += 1
            elif eqn.primitive.name == "scan":
                n += eqn.params["length"] * inner
            elif eqn.primitive.name == "while":
                assert inner == 0, "a network call inside a loop of unknown length"
            else:
                n += inner
        return n
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_nfe_is_the_number_of_network_calls():
    """samplers.nfe(name, N, schedule, **options) == the calls the sampler's program
    makes, for every sampler and every option that changes the count."""
    assert {canonical_name(n) for n, _ in NFE_CASES} == set(SAMPLERS)
    for name, options in NFE_CASES:
        den = CM_DEN if canonical_name(name) == "consistency" else DEN
        for n in (1, 2, 3, 7):
            kw = dict(options)
            if kw.get("strength", 1.0) < 1.0:
                if n < 3:  # too few steps to have one below t = 0.5
                    continue
                kw["x_init"] = jnp.zeros((1, 2))
            calls = _network_calls(lambda k: get_sampler(name)(den, k, (1, 2), n, **kw),
                                   jax.random.key(0))
            assert calls == nfe(name, n, SCHED, **options), (name, options, n)
    assert nfe("heun", 18) == 35 and nfe("ddim", 50) == 50 and nfe("dpm3", 10) == 30
    assert nfe("plms", 10, warmup="prk") == 19 and nfe("dpmpp_2m", 10, denoise_to_zero=True) == 11
    with pytest.raises(ValueError, match="no option"):
        nfe("ddim", 10, warmup="prk")
