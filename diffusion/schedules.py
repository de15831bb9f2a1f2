"""Noise schedules: the discrete table alpha_bar[i], i = 0..T-1, and its continuous view.

A schedule is defined by its discrete cumulative product alpha_bar[i] (float64 on the
host, float32 constants on device). The continuous view t in [0, 1] places index i at
t_i = (i + 1) / T and t = 0 at clean data (alpha_bar = 1), and interpolates
log(alpha_bar) linearly between grid points, as DPM-Solver does for discrete models.
The two views agree exactly on the grid, so a model trained on either can be sampled
with any sampler. The network's noise-conditioning input is c_noise(t) = t * T - 1,
which is exactly the discrete index i on the grid (the DDPM / DiT convention).

Quantities, all shaped like t: alpha_bar, alpha = sqrt(alpha_bar),
sigma = sqrt(1 - alpha_bar), logsnr = log(alpha^2 / sigma^2).

A Schedule is a `paths.GaussianPath` (variance preserving): its jnp methods are the
table interpolation above, its `host` view the same interpolation in float64 (the
samplers' grids), and d_alpha / d_sigma are the derivatives of that piecewise-linear
log alpha_bar (constant on each grid interval; the right-hand one at grid points).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from diffusion.paths import GaussianPath

# Smallest alpha_bar used inside logarithms (the samplers' host-side grids use the same).
# A cosine table ends at 2.5e-9, above it; zero-terminal-SNR tables are floored higher, at
# ZTSNR_MIN_ALPHA_BAR, by `make_schedule`.
MIN_ALPHA_BAR = 1e-20
# Zero-terminal-SNR tables end at alpha_bar = 0 exactly; diffusers (rescale_betas_zero_snr)
# sets that last entry to 2^-24 so that every noise level is finite: sigma_ve = 4096,
# logsnr = -16.6 at the last step instead of 1e10 / -46 from the log floor, which would
# put a Karras grid's sigma_max and half of DPM-Solver's logSNR grid out where no step
# does any good.
ZTSNR_MIN_ALPHA_BAR = 2.0 ** -24


def _betas_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    # Scaled by 1000 / T so that any T spans the same total noise as DDPM's T = 1000.
    scale = 1000.0 / T
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


def _betas_scaled_linear(T: int, beta_start: float = 0.00085,
                         beta_end: float = 0.012) -> np.ndarray:
    # Stable Diffusion: linear in sqrt(beta).
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2


def _betas_from_alpha_bar_fn(T: int, f: Callable[[np.ndarray], np.ndarray],
                             max_beta: float = 0.999) -> np.ndarray:
    t = np.arange(T + 1, dtype=np.float64) / T
    ab = f(t)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def _betas_cosine(T: int, s: float = 0.008) -> np.ndarray:
    # Nichol & Dhariwal (2021): alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), betas
    # clipped at 0.999 so the last steps stay invertible.
    f = lambda t: np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alpha_bar_fn(T, lambda t: f(t) / f(np.zeros_like(t)))


def _betas_sigmoid(T: int, start: float = -3.0, end: float = 3.0,
                   tau: float = 1.0) -> np.ndarray:
    # Chen (2023), "On the importance of noise scheduling": alpha_bar from a sigmoid.
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    f = lambda t: (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar_fn(T, lambda t: np.clip(f(t), 1e-9, 1.0))


BETA_SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "linear": _betas_linear,
    "cosine": _betas_cosine,
    "scaled_linear": _betas_scaled_linear,
    "sigmoid": _betas_sigmoid,
}


def rescale_zero_terminal_snr(alpha_bar: np.ndarray) -> np.ndarray:
    """Lin et al. (2024): shift and scale sqrt(alpha_bar) so the last step has SNR 0."""
    a = np.sqrt(alpha_bar)
    a0, aT = a[0], a[-1]
    a = (a - aT) * a0 / (a0 - aT)
    return a ** 2


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule(GaussianPath):
    """A noise schedule. Hashable by identity, so it can be a static jit argument."""
    name: str
    alpha_bar_table: np.ndarray  # [T] float64, decreasing
    variance_preserving = True

    @property
    def T(self) -> int:
        return int(self.alpha_bar_table.shape[0])

    # ---- discrete view -------------------------------------------------------------
    @property
    def betas(self) -> np.ndarray:
        ab = self.alpha_bar_table
        return 1.0 - ab / np.concatenate([[1.0], ab[:-1]])

    def t_of_index(self, i) -> jnp.ndarray:
        """Discrete index i (0..T-1) -> continuous time (i + 1) / T."""
        return (jnp.asarray(i, jnp.float32) + 1.0) / self.T

    def c_noise(self, t: jnp.ndarray) -> jnp.ndarray:
        """Network conditioning input: the (fractional) discrete index t * T - 1."""
        return t * self.T - 1.0

    # ---- continuous view -----------------------------------------------------------
    def _grid(self):
        t = np.arange(self.T + 1, dtype=np.float64) / self.T
        log_ab = np.log(np.maximum(np.concatenate([[1.0], self.alpha_bar_table]),
                                   MIN_ALPHA_BAR))
        return t.astype(np.float32), log_ab.astype(np.float32)

    def log_alpha_bar(self, t: jnp.ndarray) -> jnp.ndarray:
        grid_t, grid_log_ab = self._grid()
        return jnp.interp(jnp.asarray(t, jnp.float32), grid_t, grid_log_ab)

    def alpha_bar(self, t: jnp.ndarray) -> jnp.ndarray:
        return jnp.exp(self.log_alpha_bar(t))

    def alpha(self, t: jnp.ndarray) -> jnp.ndarray:
        return jnp.exp(0.5 * self.log_alpha_bar(t))

    def sigma(self, t: jnp.ndarray) -> jnp.ndarray:
        return jnp.sqrt(-jnp.expm1(self.log_alpha_bar(t)))

    def logsnr(self, t: jnp.ndarray) -> jnp.ndarray:
        log_ab = self.log_alpha_bar(t)
        return log_ab - jnp.log(-jnp.expm1(jnp.minimum(log_ab, -1e-7)))

    def t_from_logsnr(self, logsnr: jnp.ndarray) -> jnp.ndarray:
        """Inverse of logsnr(t); exact for the piecewise-linear log alpha_bar."""
        grid_t, grid_log_ab = self._grid()
        log_ab = -jnp.logaddexp(0.0, -jnp.asarray(logsnr, jnp.float32))  # log sigmoid
        # log alpha_bar decreases in t: interpolate on the reversed grid.
        return jnp.interp(log_ab, grid_log_ab[::-1], grid_t[::-1])

    def t_from_ve_sigma(self, sigma_ve: jnp.ndarray) -> jnp.ndarray:
        """Time at which the VE noise level sigma / alpha equals sigma_ve."""
        return self.t_from_logsnr(-2.0 * jnp.log(sigma_ve))

    # ---- the GaussianPath interface (host float64 and derivatives) -----------------
    def _host_grid(self):
        t = np.arange(self.T + 1, dtype=np.float64) / self.T
        ab = np.concatenate([[1.0], np.asarray(self.alpha_bar_table, np.float64)])
        return t, np.log(np.maximum(ab, MIN_ALPHA_BAR))

    def _log_ab(self, t, xp):
        if xp is jnp:
            return self.log_alpha_bar(t)
        grid_t, grid_log_ab = self._host_grid()
        return np.interp(np.asarray(t, np.float64), grid_t, grid_log_ab)

    def _alpha(self, t, xp):
        return xp.exp(0.5 * self._log_ab(t, xp))

    def _sigma(self, t, xp):
        return xp.sqrt(-xp.expm1(self._log_ab(t, xp)))

    def _logsnr(self, t, xp):
        if xp is jnp:
            return self.logsnr(t)
        log_ab = self._log_ab(t, xp)
        with np.errstate(divide="ignore"):
            return log_ab - np.log(-np.expm1(log_ab))

    def _t_from_logsnr(self, logsnr, xp):
        if xp is jnp:
            return self.t_from_logsnr(logsnr)
        grid_t, grid_log_ab = self._host_grid()
        log_ab = -np.logaddexp(0.0, -np.asarray(logsnr, np.float64))  # log sigmoid
        return np.interp(log_ab, grid_log_ab[::-1], grid_t[::-1])

    def _d_log_ab(self, t, xp):
        """Slope of the piecewise-linear log alpha_bar on t's grid interval."""
        _, grid = self._host_grid()
        slopes = xp.asarray((grid[1:] - grid[:-1]) * self.T, t.dtype)
        i = xp.clip(xp.floor(t * self.T).astype(xp.int32), 0, self.T - 1)
        return slopes[i]

    def _d_alpha(self, t, xp):
        return 0.5 * self._alpha(t, xp) * self._d_log_ab(t, xp)

    def _d_sigma(self, t, xp):
        # d sqrt(1 - ab) / dt = -ab (d log ab / dt) / (2 sigma)
        return -0.5 * xp.exp(self._log_ab(t, xp)) * self._d_log_ab(t, xp) / self._sigma(t, xp)

    def sigma2(self, t: jnp.ndarray) -> jnp.ndarray:
        return -jnp.expm1(self.log_alpha_bar(t))

    def transition(self, s, t):
        """(a, var) of x_t | x_s: ab_t / ab_s from the table, as DDPM computes it."""
        log_r = self.log_alpha_bar(t) - self.log_alpha_bar(s)
        return jnp.exp(0.5 * log_r), -jnp.expm1(log_r)

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """(logsnr at t = 1/T, logsnr at t = 1): the range the model was trained on."""
        ab = np.clip(self.alpha_bar_table, MIN_ALPHA_BAR, 1 - 1e-12)
        lam = np.log(ab) - np.log1p(-ab)
        return float(lam[0]), float(lam[-1])


def make_schedule(name: str = "linear", T: int = 1000, zero_terminal_snr: bool = False,
                  **kwargs) -> Schedule:
    """Builds a schedule by name: linear, cosine, scaled_linear or sigmoid.

    zero_terminal_snr rescales the table to end at SNR 0 (Lin et al. 2024) and then
    floors it at ZTSNR_MIN_ALPHA_BAR = 2^-24, as diffusers does."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; known: {sorted(BETA_SCHEDULES)}")
    if T < 2:
        raise ValueError(f"a schedule needs T >= 2 steps, got T={T}")
    betas = BETA_SCHEDULES[name](T, **kwargs)
    alpha_bar = np.cumprod(1.0 - betas)
    if zero_terminal_snr:
        alpha_bar = np.maximum(rescale_zero_terminal_snr(alpha_bar), ZTSNR_MIN_ALPHA_BAR)
        name = name + "+ztsnr"
    return Schedule(name=name, alpha_bar_table=alpha_bar)
