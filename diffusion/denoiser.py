"""The denoiser: a network plus its parameterisation, the one thing samplers call.

`Denoiser.predict(x_t, t, y, guidance)` returns the model's x0 and eps (and, for a
learned-variance model, its raw variance output) at continuous time t, whatever the
network predicts (eps, x0 or v). Classifier-free guidance runs the conditional and the
unconditional pass as one batched network call and combines them in eps:
eps = eps_uncond + w * (eps_cond - eps_uncond). `w` is traced, so a new value never
recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp

from diffusion import targets
from diffusion.forward_process import expand
from diffusion.schedules import Schedule

# (x [B, H, W, C], c_noise [B], y [B] or None) -> network output [B, H, W, C or 2C]
NetFn = Callable[[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


class Prediction(NamedTuple):
    x0: jnp.ndarray
    eps: jnp.ndarray
    var_out: Optional[jnp.ndarray]  # learned-variance output v in [-1, 1], else None


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    net_fn: NetFn
    schedule: Schedule
    pred_type: str = "eps"
    learned_sigma: bool = False
    clip_x0: Optional[float] = None  # clip x0 to [-c, c] (pixel models: 1.0)

    def __post_init__(self):
        targets.check_pred_type(self.pred_type)

    def _split(self, out):
        out = out.astype(jnp.float32)
        return jnp.split(out, 2, axis=-1) if self.learned_sigma else (out, None)

    def predict(self, x_t: jnp.ndarray, t, y: Optional[jnp.ndarray] = None,
                guidance=None) -> Prediction:
        """x_t [B, H, W, C], t scalar or [B]; guidance w (needs y) or None."""
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        alpha, sigma = expand(self.schedule.alpha(t), x_t), expand(self.schedule.sigma(t), x_t)
        c_noise = self.schedule.c_noise(t)
        if guidance is None:
            pred, v = self._split(self.net_fn(x_t, c_noise, y))
            x0, eps = targets.to_x0_eps(self.pred_type, pred, x_t, alpha, sigma)
        else:
            if y is None:
                raise ValueError("classifier-free guidance needs class labels y")
            y2 = jnp.concatenate([y, jnp.full_like(y, -1)])  # negative label = null class
            out = self.net_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([c_noise, c_noise]), y2)
            pred2, v2 = self._split(out)
            _, eps2 = targets.to_x0_eps(self.pred_type, pred2, jnp.concatenate([x_t, x_t]),
                                        jnp.concatenate([alpha, alpha]),
                                        jnp.concatenate([sigma, sigma]))
            eps_c, eps_u = eps2[:b], eps2[b:]
            eps = eps_u + jnp.asarray(guidance, jnp.float32) * (eps_c - eps_u)
            v = None if v2 is None else v2[:b]
            x0 = (x_t - sigma * eps) / alpha
        if self.clip_x0 is not None:
            x0 = jnp.clip(x0, -self.clip_x0, self.clip_x0)
            eps = (x_t - alpha * x0) / sigma
        return Prediction(x0, eps, v)


def from_flax(module, variables, schedule: Schedule, *, pred_type: str = "eps",
              learned_sigma: bool = False, clip_x0: Optional[float] = None) -> Denoiser:
    """Denoiser over a Flax module called as module.apply(variables, x, t, y)."""
    def net_fn(x, c_noise, y):
        return module.apply(variables, x, c_noise, y, train=False)
    return Denoiser(net_fn, schedule, pred_type, learned_sigma, clip_x0)
