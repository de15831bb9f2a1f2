"""Consistency-model losses: discretisation curricula, noise-index sampling, distances,
loss weighting and the probability-flow ODE steps of consistency distillation;
`ConsistencySpec` holds one objective's choices of them.

Discretisation. N noise levels sigma_0 < ... < sigma_{N-1} on the Karras grid
(sigma_0 = sigma_min, sigma_{N-1} = sigma_max, rho = 7); a training pair is
(sigma_n, sigma_{n+1}) with n in {0, ..., N-2}. N may change with the training step k
(a traced value), so everything here works with a traced N.

    CT  (Song et al. 2023):     N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1,
                                mu(k) = exp(s0 log(mu0) / N(k))   (target-network EMA)
    iCT (Song & Dhariwal 2023): N(k) = min(s0 2^floor(k/K'), s1) + 1,
                                K' = floor(K / (log2 floor(s1/s0) + 1)); no target EMA

Distances between the online output f_theta(x_{n+1}, sigma_{n+1}) and the target
f_target(x_n, sigma_n), per example [B]: "l2" is the per-pixel mean of squared
differences (the consistency-models code's l2); "pseudo_huber" is
sqrt(||a - b||^2 + c^2) - c with the norm over all d pixels, c = 0.00054 sqrt(d) (iCT).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from diffusion.forward_process import expand

CURRICULA = ("fixed", "ct", "ict")
INDEX_SAMPLINGS = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "inverse_step")
DISTANCES = ("l2", "pseudo_huber")
ODE_SOLVERS = ("euler", "heun")
TARGET_SCHEDULES = ("constant", "ct", "none")


def _check(value: str, known: tuple, what: str) -> str:
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; known: {known}")
    return value


# ---- discretisation ------------------------------------------------------------------

def karras_sigma(i: jnp.ndarray, num_scales: jnp.ndarray, sigma_min: float, sigma_max: float,
                 rho: float) -> jnp.ndarray:
    """sigma_i of the N-point Karras grid, i in [0, N-1]; exact at both ends."""
    i = jnp.asarray(i, jnp.float32)
    frac = i / (jnp.asarray(num_scales, jnp.float32) - 1.0)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigma = (lo + frac * (hi - lo)) ** rho
    # The boundary condition D(x, sigma_min) = x relies on sigma_0 being sigma_min exactly.
    sigma = jnp.where(i <= 0, jnp.float32(sigma_min), sigma)
    return jnp.where(frac >= 1.0, jnp.float32(sigma_max), sigma)


def ct_num_scales(k: jnp.ndarray, total_steps: int, s0: int, s1: int) -> jnp.ndarray:
    """CT's N(k) (int32): grows like sqrt(k) from s0 at k = 0 to s1 + 1 at k = K."""
    frac = jnp.asarray(k, jnp.float32) / float(max(total_steps, 1))
    n = jnp.ceil(jnp.sqrt(frac * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1.0) + 1.0
    return jnp.clip(n, 2, s1 + 1).astype(jnp.int32)


def ict_stage_steps(total_steps: int, s0: int, s1: int) -> int:
    """K': the number of steps between two doublings of N in iCT (at least 1)."""
    return max(int(total_steps // (math.log2(s1 // s0) + 1)), 1)


def ict_num_scales(k: jnp.ndarray, total_steps: int, s0: int, s1: int) -> jnp.ndarray:
    """iCT's N(k) (int32): s0 + 1, doubling (in s0 2^j) every K' steps, capped at s1 + 1."""
    stage = jnp.asarray(k, jnp.int32) // ict_stage_steps(total_steps, s0, s1)
    # Cap the exponent before exponentiating so 2^stage cannot overflow.
    max_stage = int(math.ceil(math.log2(max(s1 / s0, 1.0)))) + 1
    n = jnp.minimum(s0 * jnp.left_shift(1, jnp.minimum(stage, max_stage)), s1)
    return (n + 1).astype(jnp.int32)


def num_scales_at(k: jnp.ndarray, curriculum: str, total_steps: int, num_scales: int,
                  s0: int, s1: int) -> jnp.ndarray:
    """N at training step k for the named curriculum ("fixed" uses num_scales)."""
    _check(curriculum, CURRICULA, "consistency curriculum")
    if curriculum == "fixed":
        return jnp.asarray(num_scales, jnp.int32)
    fn = ct_num_scales if curriculum == "ct" else ict_num_scales
    return fn(k, total_steps, s0, s1)


def max_num_scales(curriculum: str, num_scales: int, s1: int) -> int:
    """The largest N the curriculum reaches (a static bound for index sampling)."""
    return num_scales if _check(curriculum, CURRICULA, "consistency curriculum") == "fixed" \
        else s1 + 1


def ct_target_ema(num_scales: jnp.ndarray, s0: int, mu0: float) -> jnp.ndarray:
    """CT's target EMA rate mu(k) = exp(s0 log(mu0) / N(k))."""
    return jnp.exp(s0 * math.log(mu0) / jnp.asarray(num_scales, jnp.float32))


# ---- noise-index sampling ------------------------------------------------------------

def sample_index(key: jax.Array, batch: int, num_scales: jnp.ndarray, max_scales: int, *,
                 method: str, sigma_min: float, sigma_max: float, rho: float,
                 p_mean: float = -1.1, p_std: float = 2.0) -> jnp.ndarray:
    """Pair indices n [B] (int32) in {0, ..., N-2}.

    "uniform": each n equally likely. "lognormal" (iCT): p(n) proportional to
    erf((log sigma_{n+1} - p_mean) / (sqrt(2) p_std)) - erf((log sigma_n - ...) / ...),
    i.e. the mass a lognormal puts on (sigma_n, sigma_{n+1}]. `max_scales` is a static
    bound on N (the curriculum's largest) that sizes the probability vector.
    """
    _check(method, INDEX_SAMPLINGS, "consistency index sampling")
    n_pairs = jnp.asarray(num_scales, jnp.int32) - 1
    if method == "uniform":
        u = jax.random.uniform(key, (batch,))
        return jnp.minimum(jnp.floor(u * n_pairs), n_pairs - 1).astype(jnp.int32)
    i = jnp.arange(max_scales - 1)
    lo = karras_sigma(i, num_scales, sigma_min, sigma_max, rho)
    hi = karras_sigma(i + 1, num_scales, sigma_min, sigma_max, rho)
    z = lambda s: erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = jnp.maximum(z(hi) - z(lo), 0.0)
    logits = jnp.where(i < n_pairs, jnp.log(mass + 1e-30), -jnp.inf)
    return jax.random.categorical(key, logits, shape=(batch,)).astype(jnp.int32)


def pair_weight(method: str, sigma_n: jnp.ndarray, sigma_n1: jnp.ndarray) -> jnp.ndarray:
    """lambda per example: 1 ("uniform") or 1 / (sigma_{n+1} - sigma_n) ("inverse_step")."""
    _check(method, WEIGHTINGS, "consistency weighting")
    if method == "uniform":
        return jnp.ones_like(sigma_n)
    return 1.0 / (sigma_n1 - sigma_n)


# ---- distances -----------------------------------------------------------------------

def default_huber_c(image_shape: tuple) -> float:
    """iCT's pseudo-Huber c = 0.00054 sqrt(d), d = H * W * C."""
    return 0.00054 * math.sqrt(math.prod(image_shape))


def distance(method: str, a: jnp.ndarray, b: jnp.ndarray, huber_c: float = 0.0) -> jnp.ndarray:
    """Per-example distance [B] between a and b [B, ...]; huber_c = 0 picks the default."""
    _check(method, DISTANCES, "consistency distance")
    diff = (a - b).astype(jnp.float32)
    axes = tuple(range(1, diff.ndim))
    if method == "l2":
        return jnp.mean(jnp.square(diff), axis=axes)
    c = huber_c if huber_c > 0 else default_huber_c(diff.shape[1:])
    return jnp.sqrt(jnp.sum(jnp.square(diff), axis=axes) + c * c) - c


# ---- probability-flow ODE steps (VE: dx/dsigma = (x - D(x, sigma)) / sigma) ----------

SigmaDenoise = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x, sigma [B]) -> x0


def euler_step(denoise: SigmaDenoise, x: jnp.ndarray, sigma: jnp.ndarray,
               sigma_next: jnp.ndarray) -> jnp.ndarray:
    """One Euler step of the PF-ODE from sigma [B] to sigma_next [B]."""
    d = (x - denoise(x, sigma)) / expand(sigma, x)
    return x + expand(sigma_next - sigma, x) * d


def heun_step(denoise: SigmaDenoise, x: jnp.ndarray, sigma: jnp.ndarray,
              sigma_next: jnp.ndarray) -> jnp.ndarray:
    """One Heun (2nd-order) step from sigma to sigma_next > 0 (EDM's Algorithm 1)."""
    h = expand(sigma_next - sigma, x)
    d = (x - denoise(x, sigma)) / expand(sigma, x)
    x_euler = x + h * d
    d_next = (x_euler - denoise(x_euler, sigma_next)) / expand(sigma_next, x)
    return x + 0.5 * h * (d + d_next)


def ode_step(solver: str, denoise: SigmaDenoise, x: jnp.ndarray, sigma: jnp.ndarray,
             sigma_next: jnp.ndarray) -> jnp.ndarray:
    _check(solver, ODE_SOLVERS, "consistency ode_solver")
    fn = euler_step if solver == "euler" else heun_step
    return fn(denoise, x, sigma, sigma_next)


# ---- the hyperparameters together ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConsistencySpec:
    """Hyperparameters of a consistency objective: the curriculum, pair sampling, weighting,
    distance and (CD) ODE solver of the functions above."""
    total_steps: int                     # K, for the curricula
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    curriculum: str = "fixed"            # fixed | ct | ict
    num_scales: int = 18                 # N of the "fixed" curriculum
    s0: int = 2
    s1: int = 150
    target_ema: float = 0.95             # mu ("constant") or mu0 ("ct")
    target_schedule: str = "constant"    # constant | ct | none (target = online, iCT)
    index_sampling: str = "uniform"      # uniform | lognormal
    index_p_mean: float = -1.1
    index_p_std: float = 2.0
    weighting: str = "uniform"           # uniform | inverse_step
    distance: str = "pseudo_huber"       # l2 | pseudo_huber
    huber_c: float = 0.0                 # 0 = 0.00054 sqrt(d)
    ode_solver: str = "heun"             # CD only: euler | heun

    def __post_init__(self):
        _check(self.curriculum, CURRICULA, "consistency.curriculum")
        _check(self.index_sampling, INDEX_SAMPLINGS, "consistency.index_sampling")
        _check(self.weighting, WEIGHTINGS, "consistency.weighting")
        _check(self.distance, DISTANCES, "consistency.distance")
        _check(self.ode_solver, ODE_SOLVERS, "consistency.ode_solver")
        _check(self.target_schedule, TARGET_SCHEDULES, "consistency.target_ema_schedule")
        if self.curriculum == "fixed" and self.num_scales < 2:
            raise ValueError(f"consistency.num_scales must be >= 2, got {self.num_scales}")
        if self.curriculum != "fixed" and not 1 <= self.s0 <= self.s1:
            raise ValueError(f"need 1 <= consistency.s0 <= s1, got s0={self.s0}, s1={self.s1}")
        if self.target_schedule != "none" and not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"consistency.target_ema must be in [0, 1), got {self.target_ema}")
        if self.target_schedule == "ct" and self.target_ema <= 0.0:
            raise ValueError("target_ema_schedule 'ct' needs target_ema (mu0) > 0")

    @property
    def has_target_net(self) -> bool:
        return self.target_schedule != "none"

    @property
    def max_scales(self) -> int:
        return max_num_scales(self.curriculum, self.num_scales, self.s1)

    def num_scales_at(self, step: jnp.ndarray) -> jnp.ndarray:
        return num_scales_at(step, self.curriculum, self.total_steps, self.num_scales,
                             self.s0, self.s1)

    def mu_at(self, num_scales: jnp.ndarray) -> jnp.ndarray:
        if self.target_schedule == "ct":
            return ct_target_ema(num_scales, self.s0, self.target_ema)
        return jnp.asarray(self.target_ema if self.has_target_net else 0.0, jnp.float32)
