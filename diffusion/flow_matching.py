"""Flow matching on any Gaussian path: time sampling, the velocity loss and its weights.

A network u_theta(x_t, t) regresses the conditional velocity of the path
x_t = alpha(t) x0 + sigma(t) eps (`diffusion.paths`),

    u = d_alpha x0 + d_sigma eps      (u = eps - x0 on the flow path alpha = 1 - t, sigma = t),

whose conditional expectation E[u | x_t] is the probability-flow velocity (Lipman et al.
2023, Liu et al. 2023). t is continuous in [0, 1]; the network sees it as
c_noise = path.c_noise(t) = T t - 1, the same input the Denoiser gives it at sampling.

Time sampling (`sample_time`; Esser et al. 2024, "SD3", section 3.1):
  uniform        t ~ U(0, 1]
  logit_normal   t = sigmoid(location + scale n), n ~ N(0, 1)
  mode           t = f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1):
                 heavier tails than the logit-normal; s = mode_scale must lie in
                 [-1, 2 / (pi - 2)] for f_mode to be monotone (s = 0: uniform)
then SD3's resolution-dependent shift t' = shift t / (1 + (shift - 1) t)
(`paths.shift_time`): logit(t') = logit(t) + log(shift), so a shifted logit-normal is
the logit-normal at location + log(shift).

Loss weights in x0-space. At fixed x_t, eps = (x_t - alpha x0) / sigma, so a velocity
error is an x0 error times a factor:

    u - u_hat = (d_alpha - d_sigma alpha / sigma)(x0 - x0_hat) = -(det / sigma)(x0 - x0_hat),
    ||u - u_hat||^2 = (det / sigma)^2 ||x0 - x0_hat||^2,  det = alpha d_sigma - sigma d_alpha.

On the flow path det = 1: ||u - u_hat||^2 = ||x0 - x0_hat||^2 / t^2, and since
sqrt(snr) = (1 - t) / t, 1 / t^2 = (1 + sqrt(snr))^2. So the plain velocity MSE
("simple") is the x0-space weight (det / sigma)^2, and "snr", "min_snr" and
"truncated_snr" are the x0-space weights of `diffusion.losses` (snr, min(snr, gamma),
max(snr, 1)) divided by (det / sigma)^2, so they mean the same thing here as there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffusion import targets
from diffusion.forward_process import expand, q_sample
from diffusion.paths import GaussianPath, shift_time

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("simple", "snr", "min_snr", "truncated_snr")
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


def mode_time(u: jnp.ndarray, s: float) -> jnp.ndarray:
    """SD3's f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u), decreasing in u for
    s in [-1, 2 / (pi - 2)], so t = f_mode(u) with u ~ U(0, 1) has density
    1 / |f_mode'(f_mode^-1(t))|."""
    return 1.0 - u - s * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)


def check_time_sampling(method: str, scale: float = 1.0, mode_scale: float = 0.0,
                        shift: float = 1.0) -> None:
    """Raises ValueError naming the first bad setting."""
    if method not in TIME_SAMPLINGS:
        raise ValueError(f"unknown flow time sampling {method!r}; known: {TIME_SAMPLINGS}")
    if method == "logit_normal" and not scale > 0:
        raise ValueError(f"logit-normal time sampling needs scale > 0, got {scale}")
    if method == "mode" and not -1.0 <= mode_scale <= MODE_SCALE_MAX:
        raise ValueError(f"mode time sampling needs mode_scale in [-1, {MODE_SCALE_MAX:.4f}] "
                         f"(f_mode must be monotone), got {mode_scale}")
    if not shift > 0:
        raise ValueError(f"the timestep shift must be > 0, got {shift}")


def sample_time(key: jax.Array, batch: int, method: str = "uniform", *,
                location: float = 0.0, scale: float = 1.0, mode_scale: float = 0.0,
                shift: float = 1.0) -> jnp.ndarray:
    """Training times t [B] in [0, 1] (see the module docstring), shifted by `shift`."""
    check_time_sampling(method, scale, mode_scale, shift)
    if method == "logit_normal":
        t = jax.nn.sigmoid(location + scale * jax.random.normal(key, (batch,)))
    else:
        u = jax.random.uniform(key, (batch,))
        t = 1.0 - u if method == "uniform" else mode_time(u, mode_scale)
    t = jnp.clip(t, 0.0, 1.0)  # f_mode rounding at u = 0, 1
    return t if shift == 1.0 else shift_time(t, shift)


def velocity_x0_weight(path: GaussianPath, t: jnp.ndarray) -> jnp.ndarray:
    """(det / sigma)^2 [B]: ||u - u_hat||^2 = this times ||x0 - x0_hat||^2 at time t
    (1 / t^2 on the flow path; +inf at t = 0)."""
    det = path.alpha(t) * path.d_sigma(t) - path.sigma(t) * path.d_alpha(t)
    return jnp.square(det / path.sigma(t))


def loss_weight(weighting: str, path: GaussianPath, t: jnp.ndarray,
                gamma: float = 5.0) -> jnp.ndarray:
    """Per-example factor [B] multiplying the velocity MSE: the x0-space weight of
    `weighting` divided by the velocity's own (det / sigma)^2."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown flow loss weighting {weighting!r}; known: {WEIGHTINGS}")
    if weighting == "simple":
        return jnp.ones_like(t)
    # w_x0 sigma^2 / det^2 with w_x0 sigma^2 written in alpha and sigma (snr sigma^2 =
    # alpha^2), so that it stays finite at t = 0 where snr and 1 / sigma are infinite.
    a2, s2 = jnp.square(path.alpha(t)), jnp.square(path.sigma(t))
    w_s2 = {"snr": a2, "min_snr": jnp.minimum(a2, gamma * s2),
            "truncated_snr": jnp.maximum(a2, s2)}[weighting]
    det = path.alpha(t) * path.d_sigma(t) - path.sigma(t) * path.d_alpha(t)
    return w_s2 / jnp.square(det)


def flow_matching_loss(net_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                       path: GaussianPath, x0: jnp.ndarray, key: jax.Array, *,
                       eps: Optional[jnp.ndarray] = None, time_sampling: str = "uniform",
                       location: float = 0.0, scale: float = 1.0, mode_scale: float = 0.0,
                       shift: float = 1.0, weighting: str = "simple",
                       min_snr_gamma: float = 5.0):
    """Per-example losses [B] and times t [B].

    net_fn(x_t, c_noise) -> velocity prediction shaped like x0 ([B, H, W, C] or [B, D]).
    eps: the noise coupled to x0 (rectified-flow reflow: the noise each generated x0
    came from); None draws it independently of x0 (flow matching).
    """
    key_t, key_eps = jax.random.split(key)
    t = sample_time(key_t, x0.shape[0], time_sampling, location=location, scale=scale,
                    mode_scale=mode_scale, shift=shift)
    if eps is None:
        eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
    elif eps.shape != x0.shape:
        raise ValueError(f"coupled noise has shape {eps.shape}, the data {x0.shape}")
    x_t = q_sample(path, x0, t, eps)
    pred = net_fn(x_t, path.c_noise(t)).astype(jnp.float32)
    u = targets.velocity(x0, eps, expand(path.d_alpha(t), x0), expand(path.d_sigma(t), x0))
    mse = jnp.mean(jnp.square(pred - u), axis=tuple(range(1, x0.ndim)))
    return loss_weight(weighting, path, t, min_snr_gamma) * mse, t
