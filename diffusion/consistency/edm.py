"""EDM preconditioning (Karras et al. 2022), its consistency-model variant, and the EDM loss.

Variance-exploding (VE) view: x = x0 + sigma eps, sigma in [sigma_min, sigma_max] =
[0.002, 80]. A network F becomes a denoiser by

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t_net(sigma))

    EDM:          c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2)
    consistency:  c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),
                  c_out  = (sigma - sigma_min) sd / sqrt(sigma^2 + sd^2)
    both:         c_in = 1 / sqrt(sigma^2 + sd^2),  c_noise = log(sigma) / 4

with sd = sigma_data = 0.5. The consistency variant (Song et al. 2023) meets the
boundary condition D(x, sigma_min) = x exactly: c_skip = 1 and c_out = 0 there.

A consistency model can also sit on a network that predicts x0 some other way (a VP
diffusion network of any pred_type and schedule, read in sigma space through
bridge.sigma_space_x0), as latent consistency models do: `denoise_from_x0` gives
f = c_skip x + (1 - c_skip) x0_hat with the consistency c_skip, so f(x, sigma_min) = x
exactly, f -> x0_hat at high noise, and a student initialised from a diffusion teacher
starts as that teacher's one-step denoiser.

Network time input. Our U-Net and DiT embed their scalar `t` with sinusoids whose
frequencies suit t of order 1 to 1000 (DDPM's indices). EDM's c_noise only spans
[-1.55, 1.10], which would leave all but the lowest frequencies nearly constant, so the
network receives t_net = net_t_scale * c_noise = 250 log(sigma) (net_t_scale = 1000,
as in the consistency-models code), i.e. t_net in [-1554, 1095] over [0.002, 80].
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffusion.forward_process import expand

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0
NET_T_SCALE = 1000.0

# (x_in [B, H, W, C], t_net [B], y [B] or None) -> F [B, H, W, C]
NetFn = Callable[[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Precond:
    """How a network becomes a denoiser D(x, sigma); see the module docstring."""
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    consistency: bool = False  # shift c_skip / c_out so that D(x, sigma_min) = x
    net_t_scale: float = NET_T_SCALE

    def __post_init__(self):
        if self.sigma_data <= 0 or self.sigma_min <= 0:
            raise ValueError(f"sigma_data ({self.sigma_data}) and sigma_min "
                             f"({self.sigma_min}) must be positive")


def edm_scalings(sigma: jnp.ndarray, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in), each shaped like sigma: EDM's own preconditioning."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * sigma_data * jax.lax.rsqrt(sigma ** 2 + sd2)
    c_in = jax.lax.rsqrt(sigma ** 2 + sd2)
    return c_skip, c_out, c_in


def consistency_scalings(sigma: jnp.ndarray, sigma_data: float = SIGMA_DATA,
                         sigma_min: float = SIGMA_MIN):
    """(c_skip, c_out, c_in) with c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly."""
    sd2 = sigma_data ** 2
    shifted = sigma - sigma_min  # exactly 0 at sigma_min: float32 minus the same float32
    c_skip = sd2 / (shifted ** 2 + sd2)
    c_out = shifted * sigma_data * jax.lax.rsqrt(sigma ** 2 + sd2)
    c_in = jax.lax.rsqrt(sigma ** 2 + sd2)
    return c_skip, c_out, c_in


def net_time(sigma: jnp.ndarray, net_t_scale: float = NET_T_SCALE) -> jnp.ndarray:
    """The network's t input: net_t_scale * c_noise, c_noise = log(sigma) / 4."""
    return net_t_scale * 0.25 * jnp.log(sigma)


def denoise(net_fn: NetFn, x: jnp.ndarray, sigma: jnp.ndarray, y: Optional[jnp.ndarray],
            precond: Precond) -> jnp.ndarray:
    """D(x, sigma) for x [B, H, W, C] (VE: x0 + sigma eps) and sigma [B] (or scalar)."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    if precond.consistency:
        c_skip, c_out, c_in = consistency_scalings(sigma, precond.sigma_data, precond.sigma_min)
    else:
        c_skip, c_out, c_in = edm_scalings(sigma, precond.sigma_data)
    f = net_fn(expand(c_in, x) * x, net_time(sigma, precond.net_t_scale), y)
    return expand(c_skip, x) * x + expand(c_out, x) * f.astype(jnp.float32)


def denoise_from_x0(x0_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
                    x: jnp.ndarray, sigma: jnp.ndarray, precond: Precond) -> jnp.ndarray:
    """f(x, sigma) = c_skip x + (1 - c_skip) x0_fn(x, sigma), c_skip of the consistency
    scalings (see the module docstring); x0_fn(x [B, H, W, C], sigma [B]) -> x0."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c_skip, _, _ = consistency_scalings(sigma, precond.sigma_data, precond.sigma_min)
    c_skip = expand(c_skip, x)
    return c_skip * x + (1.0 - c_skip) * x0_fn(x, sigma).astype(jnp.float32)


def sample_lognormal_sigma(key: jax.Array, batch: int, p_mean: float = -1.2,
                           p_std: float = 1.2) -> jnp.ndarray:
    """EDM's training noise levels: log(sigma) ~ N(p_mean, p_std^2), shape [B]."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, (batch,)))


def edm_loss_weight(sigma: jnp.ndarray, sigma_data: float = SIGMA_DATA) -> jnp.ndarray:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2 (EDM's weighting)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_loss(denoise_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray], x0: jnp.ndarray,
             key: jax.Array, *, p_mean: float = -1.2, p_std: float = 1.2,
             sigma_data: float = SIGMA_DATA):
    """Per-example EDM losses [B] and their sigma [B].

    denoise_fn(x, sigma [B]) -> D [B, H, W, C]. The loss is lambda(sigma) times the
    per-pixel mean of (D - x0)^2; with data of variance sigma_data^2 the optimal
    denoiser's expected loss is 1 at every sigma (the weighting's design goal).
    """
    k_sigma, k_eps = jax.random.split(key)
    sigma = sample_lognormal_sigma(k_sigma, x0.shape[0], p_mean, p_std)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    d = denoise_fn(x0 + expand(sigma, x0) * eps, sigma)
    mse = jnp.mean(jnp.square(d - x0), axis=tuple(range(1, x0.ndim)))
    return edm_loss_weight(sigma, sigma_data) * mse, sigma
