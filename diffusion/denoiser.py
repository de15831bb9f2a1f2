"""The denoiser: a network plus its parameterisation, the one thing samplers call.

`Denoiser.predict(x_t, t, y, guidance)` returns the model's x0 and eps (and, for a
learned-variance model, its raw variance output) at continuous time t, whatever the
network predicts (eps, x0, v or the flow velocity "flow", u = d_alpha x0 + d_sigma eps).
`schedule` is the model's Gaussian path (`diffusion.paths`: a discrete VP Schedule, a
continuous VP, VE or flow path), which the samplers read for every coefficient.

Classifier-free guidance combines the conditional and the unconditional network outputs
in the network's own parameterisation, pred = pred_u + w (pred_c - pred_u), and converts
the result to (x0, eps) once. At fixed x_t the conversion is affine in pred, so where
alpha > 0 this is exactly eps-space guidance; but it stays well defined where alpha = 0
(zero terminal SNR), where rebuilding x0 from a guided eps as (x_t - sigma eps) / alpha
divides by zero. Both passes run as one batched network call. The unconditional branch
is the null label -1, or what `uncond_fn` makes of the condition y (a text model's
negative prompt; y may then be any pytree of [B, ...] arrays). `w` is traced, so a new
value never recompiles; at w == 1 only the conditional pass runs (see `_guided_output`).
`guide_channels` guides only the first C output channels and takes the conditional
value of the rest, as the official DiT's `forward_with_cfg` does (3 of 4 latent channels).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import targets
from diffusion.forward_process import expand
from diffusion.paths import GaussianPath

# (x [B, H, W, C], c_noise [B], y [B] or None) -> network output [B, H, W, C or 2C]
NetFn = Callable[[jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


class Prediction(NamedTuple):
    x0: jnp.ndarray
    eps: jnp.ndarray
    var_out: Optional[jnp.ndarray]  # learned-variance output v in [-1, 1], else None


def _static_value(w) -> Optional[float]:
    """w as a Python float when it is known while tracing (a Python or NumPy number)."""
    if isinstance(w, numbers.Number) or (isinstance(w, np.ndarray) and w.size == 1):
        return float(w)
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    net_fn: NetFn
    schedule: GaussianPath  # any path; the name predates paths.py
    pred_type: str = "eps"
    learned_sigma: bool = False
    clip_x0: Optional[float] = None  # clip x0 to [-c, c] (pixel models: 1.0)
    guide_channels: Optional[int] = None  # CFG on the first C prediction channels only
    uncond_fn: Optional[Callable] = None  # y -> the unconditional y; None: labels -> -1

    def __post_init__(self):
        targets.check_pred_type(self.pred_type)
        if self.guide_channels is not None and int(self.guide_channels) < 1:
            raise ValueError(f"guide_channels must be a positive channel count or None "
                             f"(all channels), got {self.guide_channels}")

    @property
    def path(self) -> GaussianPath:
        return self.schedule

    def _split(self, out):
        out = out.astype(jnp.float32)
        return jnp.split(out, 2, axis=-1) if self.learned_sigma else (out, None)

    def _combine(self, cond: jnp.ndarray, uncond: jnp.ndarray, w) -> jnp.ndarray:
        """Guided network output: channels [:g] of the prediction guided, the rest (and
        a learned variance) conditional."""
        n_pred = cond.shape[-1] // 2 if self.learned_sigma else cond.shape[-1]
        g = n_pred if self.guide_channels is None else int(self.guide_channels)
        if g > n_pred:
            raise ValueError(f"guide_channels={g} but the network predicts only {n_pred} "
                             f"channels")
        mixed = uncond[..., :g] + w * (cond[..., :g] - uncond[..., :g])
        return jnp.concatenate([mixed, cond[..., g:]], axis=-1)

    def _guided_output(self, x_t, c_noise, y, guidance) -> jnp.ndarray:
        """The network output [B, ..., C or 2C] guided with weight `guidance`.

        At w == 1 guidance is the conditional output, so only that pass runs. A Python w
        is checked while tracing. A traced w goes through `lax.cond`: a real branch when
        w is a scalar (the samplers' case), so w = 1 costs one batch-B pass at run time;
        the price is compiling the network for both batch sizes. Under a vmap over w the
        cond becomes a select that runs both branches: still correct, no saving.
        """
        b = x_t.shape[0]

        def conditional():
            return self.net_fn(x_t, c_noise, y).astype(jnp.float32)

        def both():
            # The null class (label -1) or the condition's own unconditional branch.
            uncond = jnp.full_like(y, -1) if self.uncond_fn is None else self.uncond_fn(y)
            y2 = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), y, uncond)
            out = self.net_fn(jnp.concatenate([x_t, x_t]),
                              jnp.concatenate([c_noise, c_noise]), y2).astype(jnp.float32)
            return self._combine(out[:b], out[b:], w)

        static = _static_value(guidance)
        if static is not None:
            w = jnp.float32(static)
            return conditional() if static == 1.0 else both()
        w = jnp.asarray(guidance, jnp.float32)
        return jax.lax.cond(w == 1.0, conditional, both)

    def predict(self, x_t: jnp.ndarray, t, y: Optional[jnp.ndarray] = None,
                guidance=None) -> Prediction:
        """x_t [B, H, W, C], t scalar or [B]; guidance w (needs y) or None."""
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        alpha, sigma = expand(self.schedule.alpha(t), x_t), expand(self.schedule.sigma(t), x_t)
        c_noise = self.schedule.c_noise(t)
        if guidance is None:
            out = self.net_fn(x_t, c_noise, y)
        else:
            if y is None:
                raise ValueError("classifier-free guidance needs class labels y")
            out = self._guided_output(x_t, c_noise, y, guidance)
        pred, v = self._split(out)
        d_alpha = d_sigma = None
        if self.pred_type == "flow":
            d_alpha = expand(self.schedule.d_alpha(t), x_t)
            d_sigma = expand(self.schedule.d_sigma(t), x_t)
        x0, eps = targets.to_x0_eps(self.pred_type, pred, x_t, alpha, sigma, d_alpha,
                                    d_sigma, vp=self.schedule.variance_preserving)
        if self.clip_x0 is not None:
            x0 = jnp.clip(x0, -self.clip_x0, self.clip_x0)
            eps = (x_t - alpha * x0) / sigma
        return Prediction(x0, eps, v)


def from_flax(module, variables, schedule: GaussianPath, *, pred_type: str = "eps",
              learned_sigma: bool = False, clip_x0: Optional[float] = None,
              guide_channels: Optional[int] = None) -> Denoiser:
    """Denoiser over a Flax module called as module.apply(variables, x, t, y)."""
    def net_fn(x, c_noise, y):
        return module.apply(variables, x, c_noise, y, train=False)
    return Denoiser(net_fn, schedule, pred_type, learned_sigma, clip_x0, guide_channels)
