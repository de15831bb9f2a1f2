"""Samplers on the rectified-flow path (alpha = 1 - t, sigma = t) against exact ground
truth: the flow velocity of the exact mixture denoiser integrates to the exact ODE
solution, and every registered sampler reaches its theoretical order there, measured
as tests/test_analytic.py does on the VP table (RMSE against a reference ODE solve from
the sampler's own start state and time, at two step counts)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import samplers
from diffusion.analytic import metrics as M
from diffusion.analytic.end_time import sampler_end_time
from diffusion.analytic.exact import (exact_denoiser, exact_flow_map, exact_path_flow_map,
                                      velocity_ode_solve, vp_reference_solve)
from diffusion.analytic.problems import make_problem
from diffusion.paths import CosineVP, FlowPath, VEPath
from diffusion.samplers.flow import flow_times
from diffusion.schedules import make_schedule

FLOW = FlowPath()

# Order of each sampler's ODE solve on the flow path (None: stochastic). On this path
# sigma = t is smooth down to t = 0, so PLMS is not cut to first order as on the VP table
# (ORDERS in test_analytic.py): AB4 after a pseudo-improved-Euler first step and AB2, AB3,
# whose O(h^3) local errors make it third order (measured 3.03 at 20-40 steps, 2.74 at
# 50-100; at 250-500 steps its error, 3e-6, is at the float32 floor).
ORDERS_FLOW = {
    "ddim": 1, "ddpm": None, "euler": 1, "heun": 2, "euler_a": None,
    "dpm_solver_1": 1, "dpm_solver_2": 2, "dpm_solver_3": 3,
    "dpmpp_2s": 2, "dpmpp_2m": 2, "dpmpp_3m": 3,
    "plms": 3,
    "consistency": None,
    "flow_euler": 1, "flow_midpoint": 2,
}
_STEPS = (25, 50)
_STEPS_FOR = {"plms": (20, 40)}
# The Karras grids default to sigma_max = 80; the order needs the start fixed at t_max.
_OPTIONS_FOR = {name: {"sigma_max": 1e9} for name in ("euler", "heun")}


# ---- the exact velocity and the exact ODE solution --------------------------------------

@pytest.mark.parametrize("path", [FLOW, VEPath(sigma_max=5.0), CosineVP()],
                         ids=["flow", "ve", "cosine_vp"])
def test_exact_velocity_integrates_to_the_exact_flow_map(path):
    """One Gaussian: RK4 in t on u = d_alpha x0 + d_sigma eps of the exact denoiser lands
    on the closed-form flow map, from t = 1 on the flow path (alpha = 0 there)."""
    g = make_problem("gaussian2d").gmm
    t_from = 1.0 if isinstance(path, FlowPath) else 0.9
    t_to = 0.0 if not isinstance(path, CosineVP) else 0.05
    x = float(path.host.start_std(t_from)) * jax.random.normal(jax.random.key(0), (64, 2))
    exact = exact_path_flow_map(g, path, t_from, t_to)(x)
    ode = velocity_ode_solve(g, path, x, t_from, t_to, num_steps=200)
    np.testing.assert_allclose(np.asarray(ode), np.asarray(exact), atol=5e-5)


def test_path_flow_map_is_the_ve_flow_map_and_the_flow_denoiser_agrees():
    g = make_problem("gaussian2d").gmm
    sched = make_schedule("linear", 1000)
    x = jax.random.normal(jax.random.key(1), (32, 2))
    a, s = float(sched.alpha(0.7)), float(sched.sigma(0.7))
    via_ve = exact_flow_map(g, s / a, 0.0)(x / a)
    np.testing.assert_allclose(np.asarray(exact_path_flow_map(g, sched, 0.7, 0.0)(x)),
                               np.asarray(via_ve), atol=2e-5)
    # a velocity-parameterised denoiser gives the same x0 and eps as an x0 one, at t = 1
    mix = make_problem("smooth2d").gmm
    for t in (1.0, 0.4):
        p_u = exact_denoiser(mix, FLOW, pred_type="flow").predict(x, t)
        p_x0 = exact_denoiser(mix, FLOW, pred_type="x0").predict(x, t)
        np.testing.assert_allclose(np.asarray(p_u.x0), np.asarray(p_x0.x0), atol=1e-5)
        np.testing.assert_allclose(np.asarray(p_u.eps), np.asarray(p_x0.eps), atol=1e-5)


def test_mixture_reference_from_t_one_matches_the_velocity_solve():
    """A mixture has no closed form: the reference (RK4 in t to the middle, then the VE
    solve) and a fine RK4 in t all the way agree."""
    mix = make_problem("smooth2d").gmm
    x = jax.random.normal(jax.random.key(2), (64, 2))
    ref = vp_reference_solve(mix, FLOW, x, t_from=1.0, t_to=0.0, num_steps=200)
    ode = velocity_ode_solve(mix, FLOW, x, 1.0, 0.0, num_steps=400)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(ode), atol=5e-5)


# ---- the flow samplers ---------------------------------------------------------------------

def test_flow_grid_shift_and_nfe():
    np.testing.assert_allclose(flow_times(4), [1.0, 0.75, 0.5, 0.25, 0.0])
    u = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(flow_times(4, shift=3.0), 3 * u / (1 + 2 * u))
    assert samplers.nfe("flow_euler", 7, FLOW) == 7
    assert samplers.nfe("flow_midpoint", 7, FLOW, shift=3.0) == 14
    with pytest.raises(ValueError, match="shift"):
        samplers.nfe("flow_euler", 4, FLOW, shift=-1.0)


def test_one_euler_step_is_exact_for_a_point_mass_and_shift_moves_the_steps():
    """Straight trajectories (a point mass mu: x_t = (1 - t) mu + t eps) are integrated
    exactly by one Euler step; with shift the model is evaluated on the shifted grid, and
    the shifted sampler still converges to the ODE solution."""
    from diffusion.analytic.gmm import from_covariances
    mu = np.array([0.3, -0.7])
    point = from_covariances([1.0], [mu], [np.eye(2) * 1e-10])
    x_T = jax.random.normal(jax.random.key(3), (256, 2))
    run = lambda d, n, **o: jax.jit(lambda x: samplers.get_sampler("flow_euler")(  # noqa
        d, jax.random.key(0), x.shape, n, x_T=x, **o))(x_T)
    x = run(exact_denoiser(point, FLOW, pred_type="flow"), 1)
    np.testing.assert_allclose(np.asarray(x), np.broadcast_to(mu, x.shape), atol=1e-4)
    mix = make_problem("smooth2d").gmm
    den = exact_denoiser(mix, FLOW, pred_type="flow")
    ref = vp_reference_solve(mix, FLOW, x_T, 1.0, 0.0, num_steps=200)
    _, traj = jax.jit(lambda x: samplers.get_sampler("flow_euler")(
        den, jax.random.key(0), x.shape, 4, x_T=x, shift=3.0, return_intermediates=True))(x_T)
    np.testing.assert_allclose(np.asarray(traj.t), flow_times(4, shift=3.0)[:-1], rtol=1e-6)
    err = [M.rmse(run(den, n, shift=3.0), ref) for n in (4, 16)]
    assert err[1] < 0.3 * err[0], err


@pytest.fixture(scope="module")
def flow_problem():
    gmm = make_problem("smooth2d").gmm
    x_T = jax.random.normal(jax.random.key(14), (128, 2))
    return gmm, exact_denoiser(gmm, FLOW, pred_type="flow"), x_T


def _order(name, flow_problem):
    gmm, den, x_T = flow_problem
    sample = samplers.get_sampler(name)
    steps = _STEPS_FOR.get(name, _STEPS)
    opts = _OPTIONS_FOR.get(name, {})
    runs = [jax.jit(lambda x, s=s: sample(den, jax.random.key(0), x.shape, s, x_T=x,
                                          return_intermediates=True, **opts))(x_T)
            for s in steps]
    t_start = float(runs[0][1].t[0])
    t_end = sampler_end_time(sample, FLOW, **opts)
    x_start = float(FLOW.host.start_std(t_start)) * x_T
    ref = vp_reference_solve(gmm, FLOW, x_start, t_from=t_start, t_to=t_end, num_steps=400)
    nfe = [samplers.nfe(name, s, FLOW, **opts) for s in steps]
    err = [M.rmse(x, ref) for x, _ in runs]
    return M.convergence_order(nfe, err), err


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_registered_sampler_has_its_order_on_the_flow_path(name, flow_problem):
    if name not in ORDERS_FLOW:
        pytest.fail(f"sampler {name!r} is registered but has no order on the flow path in "
                    f"ORDERS_FLOW (None for stochastic samplers): add it")
    order = ORDERS_FLOW[name]
    if order is None:  # stochastic: different keys must give different, finite samples
        _, den, x_T = flow_problem
        sample = samplers.get_sampler(name)
        a, b = (sample(den, jax.random.key(k), x_T.shape, 4, x_T=x_T) for k in (0, 1))
        assert np.all(np.isfinite(np.asarray(a)))
        assert not np.allclose(np.asarray(a), np.asarray(b))
        return
    measured, err = _order(name, flow_problem)
    assert abs(measured - order) < 0.3, (name, order, measured, err)


def test_ddpm_on_the_flow_path_reaches_the_mixture():
    """Ancestral sampling needs only the Markov forward process, which the flow path has
    (from t = 1, where alpha = 0, as well)."""
    gmm = make_problem("gmm2d").gmm
    den = exact_denoiser(gmm, FLOW, pred_type="flow")
    x = jax.jit(lambda k: samplers.get_sampler("ddpm")(den, k, (2000, 2), 200))(
        jax.random.key(4))
    w = M.mode_weights(gmm, x)
    assert np.abs(w - gmm.weights).max() < 0.05, (w, gmm.weights)


def test_heun_on_the_ve_path_starts_from_sigma_max_noise():
    """On a VE path the start state is start_std x_T = sqrt(1 + sigma_max^2) x_T: Heun
    follows the exact flow map from there, its error falling as NFE^-2."""
    ve = VEPath(sigma_max=20.0, sigma_min=0.002)
    g = make_problem("gaussian2d").gmm
    den = exact_denoiser(g, ve, pred_type="x0")
    x_T = jax.random.normal(jax.random.key(5), (256, 2))
    x_start = float(ve.host.start_std(1.0)) * x_T
    assert float(jnp.std(x_start)) > 15.0
    ref = exact_path_flow_map(g, ve, 1.0, 0.0)(x_start)
    err = [M.rmse(jax.jit(lambda x, n=n: samplers.get_sampler("heun")(
        den, jax.random.key(0), x.shape, n, x_T=x, sigma_max=1e9))(x_T), ref)
        for n in (20, 40)]
    assert err[0] < 0.02 and 3.0 < err[0] / err[1] < 5.0, err
