"""Gaussian probability paths x_t = alpha(t) x0 + sigma(t) eps, t in [0, 1].

One interface covers diffusion and flow matching: the variance-preserving schedules
(alpha^2 + sigma^2 = 1: the discrete ᾱ tables of `schedules.Schedule`, which subclasses
`GaussianPath`, and the continuous `CosineVP`, `LinearVP`), the variance-exploding path
of EDM (`VEPath`: alpha = 1, sigma = sigma_max t) and the rectified-flow / linear
interpolant (`FlowPath`: alpha = 1 - t, sigma = t). t = 0 is clean data everywhere.

Quantities, all shaped like t: alpha, sigma, their time derivatives d_alpha, d_sigma,
the log-SNR logsnr = 2 log(alpha / sigma) (decreasing in t) and its inverse
t_from_logsnr. The probability-flow ODE of any path is dx/dt = u(x, t) with the flow
velocity u = d_alpha x0 + d_sigma eps (u = eps - x0 on the linear path), x0 and eps the
posterior means; in the path's natural variables x / alpha and sigma / alpha it is the
same ODE for every path (`d(x/alpha) / d(sigma/alpha) = eps`), so a path only decides
where a sampler's steps fall.

Two evaluation modes: the public methods take and return jnp float32 (device code:
the forward process, the Denoiser); `path.host` is the same path in numpy float64, for
the samplers' grid and coefficient computations on the host.

What a sampler needs beyond the formulas:
- T: the resolution of discrete-index grids and of the network's noise input
  c_noise(t) = T t - 1 (the fractional DDPM index; t_from_c_noise inverts it);
- t_min, t_max: the lowest and highest time a model is evaluated at by default, where
  logsnr is finite (a flow path has alpha(1) = 0: logSNR-uniform grids start at
  t_max = 1 - 1/T there, as diffusers' flow DPM-Solver does);
- start_std(t): the standard deviation of x_t for data of unit variance per dimension,
  sqrt(alpha^2 + sigma^2), by which a standard-normal x_T becomes the start state at t
  (exactly 1 on variance-preserving paths, so there x_T is the state, as it always was).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np


class GaussianPath:
    """Base class: subclasses define _alpha, _sigma, _d_alpha, _d_sigma and
    _t_from_logsnr over an array module xp (numpy or jax.numpy), and the attributes
    name, T, t_min, t_max. Hashable by identity (a static jit argument)."""

    name: str
    T: int
    variance_preserving: bool = False

    # ---- to implement, xp-generic -----------------------------------------------------
    def _alpha(self, t, xp):
        raise NotImplementedError

    def _sigma(self, t, xp):
        raise NotImplementedError

    def _d_alpha(self, t, xp):
        raise NotImplementedError

    def _d_sigma(self, t, xp):
        raise NotImplementedError

    def _t_from_logsnr(self, logsnr, xp):
        raise NotImplementedError

    def _logsnr(self, t, xp):
        a, s = self._alpha(t, xp), self._sigma(t, xp)
        with np.errstate(divide="ignore"):
            return 2.0 * (xp.log(a) - xp.log(s))

    @property
    def t_min(self) -> float:
        return 1.0 / self.T

    @property
    def t_max(self) -> float:
        return 1.0

    # ---- device (jnp float32) ---------------------------------------------------------
    def alpha(self, t) -> jnp.ndarray:
        return self._alpha(jnp.asarray(t, jnp.float32), jnp)

    def sigma(self, t) -> jnp.ndarray:
        return self._sigma(jnp.asarray(t, jnp.float32), jnp)

    def d_alpha(self, t) -> jnp.ndarray:
        """d alpha / dt."""
        return self._d_alpha(jnp.asarray(t, jnp.float32), jnp)

    def d_sigma(self, t) -> jnp.ndarray:
        """d sigma / dt."""
        return self._d_sigma(jnp.asarray(t, jnp.float32), jnp)

    def logsnr(self, t) -> jnp.ndarray:
        """2 log(alpha / sigma): +inf at t = 0, -inf where alpha = 0."""
        return self._logsnr(jnp.asarray(t, jnp.float32), jnp)

    def t_from_logsnr(self, logsnr) -> jnp.ndarray:
        return self._t_from_logsnr(jnp.asarray(logsnr, jnp.float32), jnp)

    def t_from_ve_sigma(self, sigma_ve) -> jnp.ndarray:
        """Time at which sigma / alpha equals sigma_ve."""
        return self.t_from_logsnr(-2.0 * jnp.log(sigma_ve))

    def c_noise(self, t) -> jnp.ndarray:
        """Network conditioning input: T t - 1 (the fractional DDPM index)."""
        return t * self.T - 1.0

    def t_from_c_noise(self, c_noise) -> jnp.ndarray:
        return (jnp.asarray(c_noise, jnp.float32) + 1.0) / self.T

    def sigma2(self, t) -> jnp.ndarray:
        """sigma(t)^2 (a VP table computes it as 1 - alpha_bar without a square root)."""
        return self.sigma(t) ** 2

    def start_std(self, t):
        """sqrt(alpha^2 + sigma^2) at t: the scale of the start state for x_T ~ N(0, I)
        (Python 1.0 on variance-preserving paths, so VP samplers are unchanged)."""
        if self.variance_preserving:
            return 1.0
        return jnp.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)

    def transition(self, s, t):
        """(a, var): x_t | x_s = N(a x_s, var I) for s < t, a = alpha_t / alpha_s and
        var = sigma_t^2 (1 - SNR_t / SNR_s) (jnp, shaped like t)."""
        s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
        a = self.alpha(t) / self.alpha(s)
        var = self.sigma2(t) * -jnp.expm1(self.logsnr(t) - self.logsnr(s))
        return a, var

    @property
    def host(self) -> "HostPath":
        """This path in numpy float64 (for samplers' host-side coefficients)."""
        return HostPath(self)

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """(logsnr at t_min, logsnr at t_max): the range a model is evaluated on."""
        return (float(self.host.logsnr(self.t_min)), float(self.host.logsnr(self.t_max)))


class HostPath:
    """A path's formulas in numpy float64: alpha, sigma, d_alpha, d_sigma, logsnr,
    lam = logsnr / 2, t_from_logsnr, t_from_lam, ve_sigma = sigma / alpha,
    t_from_ve_sigma, alpha_from_ve_sigma and start_std."""

    def __init__(self, path: GaussianPath):
        self.path = path

    def _f64(self, t):
        return np.asarray(t, np.float64)

    def alpha(self, t) -> np.ndarray:
        return self.path._alpha(self._f64(t), np)

    def sigma(self, t) -> np.ndarray:
        return self.path._sigma(self._f64(t), np)

    def d_alpha(self, t) -> np.ndarray:
        return self.path._d_alpha(self._f64(t), np)

    def d_sigma(self, t) -> np.ndarray:
        return self.path._d_sigma(self._f64(t), np)

    def logsnr(self, t) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return self.path._logsnr(self._f64(t), np)

    def lam(self, t) -> np.ndarray:
        """Half log-SNR log(alpha / sigma) (DPM-Solver's lambda)."""
        return 0.5 * self.logsnr(t)

    def t_from_logsnr(self, logsnr) -> np.ndarray:
        return self.path._t_from_logsnr(self._f64(logsnr), np)

    def t_from_lam(self, lam) -> np.ndarray:
        return self.t_from_logsnr(2.0 * self._f64(lam))

    def ve_sigma(self, t) -> np.ndarray:
        return np.exp(-self.lam(t))

    def t_from_ve_sigma(self, sigma_ve) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return self.t_from_lam(-np.log(self._f64(sigma_ve)))

    def alpha_from_ve_sigma(self, sigma_ve) -> np.ndarray:
        """alpha at the time where sigma / alpha = sigma_ve (1 / sqrt(1 + s^2) on VP)."""
        s = self._f64(sigma_ve)
        if self.path.variance_preserving:
            return 1.0 / np.sqrt(1.0 + s * s)
        return self.alpha(self.t_from_ve_sigma(s))

    def start_std(self, t) -> np.ndarray:
        if self.path.variance_preserving:
            return np.ones_like(self._f64(t))
        return np.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)


# ---- variance preserving, continuous --------------------------------------------------

def _vp_sigma(log_alpha, xp):
    # sqrt(1 - alpha^2) as -expm1: near t = 0, 1 - alpha^2 in float32 keeps few digits.
    return xp.sqrt(-xp.expm1(2.0 * log_alpha))


def _vp_logsnr(log_alpha, xp):
    with np.errstate(divide="ignore"):
        return 2.0 * log_alpha - xp.log(-xp.expm1(2.0 * log_alpha))


@dataclasses.dataclass(frozen=True, eq=False)
class CosineVP(GaussianPath):
    """Nichol & Dhariwal's cosine schedule in continuous time: alpha(t) = f(t) / f(0),
    f(t) = cos(pi/2 (t + s) / (1 + s)); alpha(1) = 0, so t_max = 1 - 1/T."""
    s: float = 0.008
    T: int = 1000
    name: str = "cosine_vp"
    variance_preserving = True

    def _phi(self, t):
        return 0.5 * math.pi * (t + self.s) / (1.0 + self.s)

    @property
    def _f0(self) -> float:
        return math.cos(0.5 * math.pi * self.s / (1.0 + self.s))

    def _alpha(self, t, xp):
        return xp.cos(self._phi(t)) / self._f0

    def _sigma(self, t, xp):
        # 1 - alpha^2 = sin(phi - phi_0) sin(phi + phi_0) / f(0)^2, without cancellation.
        phi, phi0 = self._phi(t), self._phi(0.0)  # phi - phi0 = pi/2 t / (1 + s)
        prod = xp.sin(0.5 * math.pi * t / (1.0 + self.s)) * xp.sin(phi + phi0)
        return xp.sqrt(xp.maximum(prod, 0.0)) / self._f0

    def _d_alpha(self, t, xp):
        return -xp.sin(self._phi(t)) * (0.5 * math.pi / (1.0 + self.s)) / self._f0

    def _d_sigma(self, t, xp):
        return -self._alpha(t, xp) * self._d_alpha(t, xp) / self._sigma(t, xp)

    def _t_from_logsnr(self, logsnr, xp):
        alpha = xp.exp(-0.5 * xp.logaddexp(0.0, -logsnr))  # sqrt(sigmoid(logsnr))
        phi = xp.arccos(xp.clip(alpha * self._f0, -1.0, 1.0))
        return xp.clip(phi * (1.0 + self.s) / (0.5 * math.pi) - self.s, 0.0, 1.0)

    @property
    def t_max(self) -> float:
        return 1.0 - 1.0 / self.T


@dataclasses.dataclass(frozen=True, eq=False)
class LinearVP(GaussianPath):
    """The continuous limit of DDPM's linear betas (Song et al. 2021, VP SDE):
    log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2 (beta 0.1 .. 20)."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    T: int = 1000
    name: str = "linear_vp"
    variance_preserving = True

    def _log_alpha(self, t, xp):
        return -0.25 * (self.beta_max - self.beta_min) * t ** 2 - 0.5 * self.beta_min * t

    def _alpha(self, t, xp):
        return xp.exp(self._log_alpha(t, xp))

    def _sigma(self, t, xp):
        return _vp_sigma(self._log_alpha(t, xp), xp)

    def _logsnr(self, t, xp):
        return _vp_logsnr(self._log_alpha(t, xp), xp)

    def _d_alpha(self, t, xp):
        beta = self.beta_min + (self.beta_max - self.beta_min) * t
        return -0.5 * beta * self._alpha(t, xp)

    def _d_sigma(self, t, xp):
        return -self._alpha(t, xp) * self._d_alpha(t, xp) / self._sigma(t, xp)

    def _t_from_logsnr(self, logsnr, xp):
        log_ab = -xp.logaddexp(0.0, -logsnr)  # log alpha^2 = log sigmoid(logsnr)
        db = self.beta_max - self.beta_min
        # (db / 2) t^2 + beta_min t + log_ab = 0, the positive root.
        return (-self.beta_min + xp.sqrt(self.beta_min ** 2 - 2.0 * db * log_ab)) / db


# ---- variance exploding and flow -------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class VEPath(GaussianPath):
    """alpha = 1, sigma = sigma_max t: EDM's sigma(t) = t, rescaled to t in [0, 1];
    t_min = sigma_min / sigma_max (EDM: 0.002 / 80)."""
    sigma_max: float = 80.0
    sigma_min: float = 0.002
    T: int = 1000
    name: str = "ve"

    def __post_init__(self):
        if not 0.0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"VEPath needs 0 < sigma_min < sigma_max, got "
                             f"{self.sigma_min}, {self.sigma_max}")

    def _alpha(self, t, xp):
        return xp.ones_like(t)

    def _sigma(self, t, xp):
        return self.sigma_max * t

    def _d_alpha(self, t, xp):
        return xp.zeros_like(t)

    def _d_sigma(self, t, xp):
        return self.sigma_max * xp.ones_like(t)

    def _t_from_logsnr(self, logsnr, xp):
        return xp.exp(-0.5 * logsnr) / self.sigma_max

    @property
    def t_min(self) -> float:
        return self.sigma_min / self.sigma_max


@dataclasses.dataclass(frozen=True, eq=False)
class FlowPath(GaussianPath):
    """The rectified-flow / linear interpolant: alpha = 1 - t, sigma = t, velocity
    u = eps - x0. alpha(1) = 0, so t_max = 1 - 1/T for logSNR grids; samplers that
    integrate in t (Euler, midpoint, DDIM) start at t = 1, where x_1 = eps exactly."""
    T: int = 1000
    name: str = "flow"

    def _alpha(self, t, xp):
        return 1.0 - t

    def _sigma(self, t, xp):
        return t

    def _d_alpha(self, t, xp):
        return -xp.ones_like(t)

    def _d_sigma(self, t, xp):
        return xp.ones_like(t)

    def _t_from_logsnr(self, logsnr, xp):
        return 1.0 / (1.0 + xp.exp(0.5 * logsnr))  # alpha / sigma = (1 - t) / t

    @property
    def t_max(self) -> float:
        return 1.0 - 1.0 / self.T


PATHS: dict[str, Callable[..., GaussianPath]] = {
    "cosine_vp": CosineVP,
    "linear_vp": LinearVP,
    "ve": VEPath,
    "flow": FlowPath,
}


def make_path(name: str, **kwargs) -> GaussianPath:
    """A continuous path by name (cosine_vp, linear_vp, ve, flow); discrete ᾱ tables
    come from `schedules.make_schedule`."""
    if name not in PATHS:
        raise ValueError(f"unknown Gaussian path {name!r}; known: {sorted(PATHS)} "
                         f"(discrete VP tables: schedules.make_schedule)")
    return PATHS[name](**kwargs)


def shift_time(t, shift: float):
    """SD3's resolution-dependent timestep shift t' = shift t / (1 + (shift - 1) t)
    (shift > 1 moves the grid towards noise; shift = 1 is the identity)."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)
