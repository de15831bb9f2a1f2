"""Exact models of a Gaussian mixture: denoiser, flow map, consistency function, and a
high-accuracy probability-flow ODE solve to compare samplers against.

Probability-flow ODE in VE coordinates (x_bar = x_t / alpha, sigma_bar = sigma / alpha,
x_bar = x0 + sigma_bar eps): d x_bar / d sigma_bar = E[eps | x_bar]. It does not depend on
the schedule, which only decides where a sampler's steps fall.

For one Gaussian N(mu, Sigma = Q diag(lam) Q^T) the ODE is linear and solves in closed
form along each eigen-direction, y(sigma) proportional to sqrt(lam + sigma^2):

    x_to = mu + (Sigma + s_to^2 I)^{1/2} (Sigma + s_from^2 I)^{-1/2} (x_from - mu),

an affine map; with s_to = 0 it is the consistency function
x0 = mu + Sigma^{1/2} (Sigma + sigma^2 I)^{-1/2} (x_sigma - mu). A mixture's flow map has
no closed form: `reference_ode_solve` (RK4, many steps) is the reference there, and
`exact_consistency_denoiser` wraps either as the x0 of a perfect consistency model.

Any Gaussian path (`diffusion.paths`: VP, VE, flow). Its marginals are mixtures too
(component k of x_t is N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)), so the exact denoiser
and velocity hold on every path, and in path coordinates the Gaussian flow map reads

    x_to - alpha_to mu = C_to^{1/2} C_from^{-1/2} (x_from - alpha_from mu),
    C = alpha^2 Sigma + sigma^2 I                       (`exact_path_flow_map`),

defined at alpha_from = 0 too (the flow path's t = 1). `path_reference_solve` is the
mixture reference on any path: the VE solve above from x / alpha where alpha > 0; from a
start with alpha = 0 it first integrates dx/dt = u in t (RK4, `velocity_ode_solve`) to
the middle of the interval, where the velocity of the flow path is smooth.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import targets
from diffusion.analytic.gmm import GaussianMixture, posterior
from diffusion.denoiser import Denoiser
from diffusion.paths import GaussianPath

Schedule = GaussianPath  # any path; the argument names predate paths.py


def exact_denoiser(gmm: GaussianMixture, schedule: Schedule, *, pred_type: str = "eps"
                   ) -> Denoiser:
    """A Denoiser whose network is the exact posterior of `gmm` under `schedule` (any
    Gaussian path).

    The network takes x of any shape [B, ...] whose trailing size is gmm.dim (e.g.
    [B, H, W, C] with H W C = D for image-sized mixtures) and predicts `pred_type`
    (eps, x0, v or the flow velocity "flow") exactly. Labels y select components by their mixture label; y < 0 is
    the null class, so classifier-free guidance runs on it unchanged.
    """
    targets.check_pred_type(pred_type)

    def net_fn(x, c_noise, y):
        b = x.shape[0]
        if int(np.prod(x.shape[1:])) != gmm.dim:
            raise ValueError(f"input of shape {x.shape} does not hold D={gmm.dim} values "
                             f"per sample")
        t = schedule.t_from_c_noise(c_noise)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x0, eps = posterior(gmm, x.reshape(b, gmm.dim).astype(jnp.float32), alpha, sigma, y)
        d_alpha = d_sigma = None
        if pred_type == "flow":
            d_alpha, d_sigma = schedule.d_alpha(t)[:, None], schedule.d_sigma(t)[:, None]
        out = targets.target(pred_type, x0, eps, alpha[:, None], sigma[:, None], d_alpha,
                             d_sigma)
        return out.reshape(x.shape)

    return Denoiser(net_fn, schedule, pred_type)


def _single(gaussian: GaussianMixture) -> GaussianMixture:
    if gaussian.num_components != 1:
        raise ValueError(f"the closed-form flow map needs one Gaussian, got "
                         f"{gaussian.num_components} components; for mixtures use "
                         f"reference_ode_solve (or gmm.component(k) for one of them)")
    return gaussian


def exact_flow_map(gaussian: GaussianMixture, sigma_from, sigma_to
                   ) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """x_bar at VE noise level sigma_from [B, D] -> x_bar at sigma_to, along the exact
    probability-flow ODE of one Gaussian. sigma_* are VE levels (sigma / alpha), scalars
    or [B]; sigma_to = 0 gives the consistency function."""
    g = _single(gaussian)
    mu = jnp.asarray(g.means[0], jnp.float32)
    q = jnp.asarray(g.basis[0], jnp.float32)
    lam = jnp.asarray(g.eigvals[0], jnp.float32)
    s2 = jnp.float32(g.iso_var[0])

    def flow(x):
        b = x.shape[0]
        sf2, st2 = _column(sigma_from, b) ** 2, _column(sigma_to, b) ** 2
        d = x - mu
        v = d @ q
        perp = d - v @ q.T
        gain = jnp.sqrt((lam + st2) / (lam + sf2))       # [B, r]
        gain_iso = jnp.sqrt((s2 + st2) / (s2 + sf2))     # [B, 1]
        return mu + (v * gain) @ q.T + gain_iso * perp

    return flow


def exact_path_flow_map(gaussian: GaussianMixture, path: GaussianPath, t_from, t_to
                        ) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """x_t [B, D] at time t_from -> x at t_to along the exact probability-flow ODE of one
    Gaussian on `path` (t_* scalars or [B]); see the module docstring. Works from
    alpha_from = 0 (the flow path's t = 1) and to t_to = 0."""
    g = _single(gaussian)
    mu = jnp.asarray(g.means[0], jnp.float32)
    q = jnp.asarray(g.basis[0], jnp.float32)
    lam = jnp.asarray(g.eigvals[0], jnp.float32)
    s2 = jnp.float32(g.iso_var[0])

    def flow(x):
        b = x.shape[0]
        t_f, t_t = _column(t_from, b), _column(t_to, b)
        a_f, sg_f = path.alpha(t_f), path.sigma(t_f)
        a_t, sg_t = path.alpha(t_t), path.sigma(t_t)
        d = x - a_f * mu
        v = d @ q
        perp = d - v @ q.T
        gain = jnp.sqrt((a_t ** 2 * lam + sg_t ** 2) / (a_f ** 2 * lam + sg_f ** 2))
        gain_iso = jnp.sqrt((a_t ** 2 * s2 + sg_t ** 2) / (a_f ** 2 * s2 + sg_f ** 2))
        return a_t * mu + (v * gain) @ q.T + gain_iso * perp

    return flow


def exact_velocity(gmm: GaussianMixture, path: GaussianPath, x_t: jnp.ndarray, t,
                   y=None) -> jnp.ndarray:
    """u(x_t, t) = d_alpha E[x0 | x_t] + d_sigma E[eps | x_t], [B, D]: the exact
    probability-flow velocity dx/dt on `path`."""
    b = x_t.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    x0, eps = posterior(gmm, x_t, path.alpha(t), path.sigma(t), y)
    return targets.velocity(x0, eps, path.d_alpha(t)[:, None], path.d_sigma(t)[:, None])


@functools.partial(jax.jit, static_argnames=("gmm", "path", "num_steps"))
def velocity_ode_solve(gmm: GaussianMixture, path: GaussianPath, x_t: jnp.ndarray,
                       t_from, t_to, y=None, *, num_steps: int = 200) -> jnp.ndarray:
    """dx/dt = u(x, t) from t_from to t_to (scalars) by classic RK4 in t, x_t [B, D].
    Accurate where u is smooth in t (the flow path, everywhere; VP paths away from t = 0,
    where sigma ~ sqrt(t))."""
    h = (jnp.float32(t_to) - jnp.float32(t_from)) / num_steps
    u = lambda x, t: exact_velocity(gmm, path, x, t, y)  # noqa: E731

    def step(x, i):
        t = jnp.float32(t_from) + i * h
        k1 = u(x, t)
        k2 = u(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = u(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = u(x + h * k3, t + h)
        return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4), None

    x, _ = jax.lax.scan(step, x_t.astype(jnp.float32), jnp.arange(num_steps, dtype=jnp.float32))
    return x


def exact_consistency_function(gaussian: GaussianMixture, schedule: Schedule
                               ) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """f(x_t [B, ...], t [B]) -> x0 [B, ...]: the exact consistency function of one
    Gaussian in the schedule's VP coordinates (the endpoint of the ODE through x_t)."""
    g = _single(gaussian)

    def f(x_t, t):
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_bar = x_t.reshape(b, g.dim) / alpha[:, None]
        return exact_flow_map(g, sigma / alpha, 0.0)(x_bar).reshape(x_t.shape)

    return f


def _column(a, b: int) -> jnp.ndarray:
    """Scalar or [B] -> [B, 1] float32."""
    return jnp.broadcast_to(jnp.asarray(a, jnp.float32), (b,))[:, None]


@functools.partial(jax.jit, static_argnames=("gmm", "num_steps", "rho"))
def reference_ode_solve(gmm: GaussianMixture, x_bar: jnp.ndarray, sigma_from, sigma_to=0.0,
                        y: Optional[jnp.ndarray] = None, *, num_steps: int = 400,
                        rho: float = 7.0) -> jnp.ndarray:
    """Probability-flow ODE from VE level sigma_from to sigma_to (scalars or [B]),
    x_bar [B, D].

    Classic RK4 in tau = sigma^(1/rho) (EDM's step density, rho = 7): the solution is
    smooth in tau down to sigma = 0, where the right-hand side rho tau^(rho-1) E[eps]
    vanishes, so the last step to clean data is as accurate as the others.
    """
    b = x_bar.shape[0]
    tau_from = _column(sigma_from, b) ** (1.0 / rho)
    tau_to = _column(sigma_to, b) ** (1.0 / rho)
    h = (tau_to - tau_from) / num_steps

    def rhs(x, tau):  # tau [B, 1]
        _, eps = posterior(gmm, x, 1.0, tau[:, 0] ** rho, y)
        return rho * tau ** (rho - 1.0) * eps

    def step(x, i):
        tau = tau_from + i * h
        k1 = rhs(x, tau)
        k2 = rhs(x + 0.5 * h * k1, tau + 0.5 * h)
        k3 = rhs(x + 0.5 * h * k2, tau + 0.5 * h)
        k4 = rhs(x + h * k3, tau + h)
        return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4), None

    x, _ = jax.lax.scan(step, x_bar.astype(jnp.float32), jnp.arange(num_steps, dtype=jnp.float32))
    return x


def vp_reference_solve(gmm: GaussianMixture, schedule: Schedule, x_t: jnp.ndarray,
                       t_from: float = 1.0, t_to: float = 0.0, y=None, *,
                       num_steps: int = 400) -> jnp.ndarray:
    """The ODE solve in the path's own coordinates (any Gaussian path; the name predates
    paths.py): x_t [B, ...] at t_from -> x at t_to (t_to = 0: the clean sample).
    Samplers started from x_t should land on this. From a start where alpha = 0 (the
    flow path's t = 1) the first half of [t_to, t_from] is integrated in t
    (`velocity_ode_solve`, num_steps RK4 steps)."""
    b = x_t.shape[0]
    a_f = float(schedule.alpha(jnp.float32(t_from)))
    if a_f <= 0.0:
        t_mid = 0.5 * (float(t_from) + float(t_to))
        x_mid = velocity_ode_solve(gmm, schedule, x_t.reshape(b, gmm.dim), float(t_from),
                                   t_mid, y, num_steps=num_steps)
        return vp_reference_solve(gmm, schedule, x_mid, t_mid, t_to, y,
                                  num_steps=num_steps).reshape(x_t.shape)
    a_f, s_f = (float(f(jnp.float32(t_from))) for f in (schedule.alpha, schedule.sigma))
    a_t, s_t = (float(f(jnp.float32(t_to))) for f in (schedule.alpha, schedule.sigma))
    x_bar = x_t.reshape(b, gmm.dim).astype(jnp.float32) / a_f
    x = reference_ode_solve(gmm, x_bar, s_f / a_f, s_t / a_t, y, num_steps=num_steps)
    return (a_t * x).reshape(x_t.shape)


def exact_consistency_denoiser(gmm: GaussianMixture, schedule: Schedule, *,
                               ode_steps: int = 64) -> Denoiser:
    """A Denoiser whose x0 is the exact consistency function (the ODE's end point from
    x_t), what a perfect consistency model predicts: closed form for one Gaussian, an RK4
    solve of `ode_steps` steps for a mixture (4 ode_steps posterior evaluations per call).
    """
    closed_form = exact_consistency_function(gmm, schedule) if gmm.num_components == 1 else None

    def net_fn(x, c_noise, y):
        t = schedule.t_from_c_noise(c_noise)
        x = x.astype(jnp.float32)
        if closed_form is not None:
            return closed_form(x, t)
        b = x.shape[0]
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_bar = x.reshape(b, gmm.dim) / alpha[:, None]
        x0 = reference_ode_solve(gmm, x_bar, sigma / alpha, 0.0, y, num_steps=ode_steps)
        return x0.reshape(x.shape)

    return Denoiser(net_fn, schedule, "x0")
