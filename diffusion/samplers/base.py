"""What every sampler shares: time-step spacings and per-sample noise.

A sampler is a pure function
    sample(denoiser, key, shape, num_steps, *, y=None, guidance=None, x_T=None,
           sample_offset=0, **options) -> x0 [B, H, W, C]
that runs its whole loop inside one `lax.scan`, so one `jax.jit` around it compiles
the loop once. The noise of sample i is drawn from fold_in(key, sample_offset + i) alone,
so a sample does not change with batch size or device count.

Image-to-image (`x_init`, `strength` in (0, 1]; the samplers built on `plan`): a sampler
keeps only the steps of its grid with t <= strength and starts from q_sample(x_init,
t_first), t_first the first kept time, with the same per-sample noise (salt 0) that x_T
would have used. `check_img2img` and `img2img_start` are the shared pieces.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.forward_process import q_sample

SPACINGS = ("linspace", "leading", "trailing")


def timesteps(T: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
    """Descending discrete indices in [0, T-1] visited by an N-step sampler.

    linspace: round(linspace(0, T-1, N)); leading: k * (T // N) (DDIM's original);
    trailing: round(T - k T / N) - 1, which always starts at T-1 (Lin et al. 2024).
    """
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if spacing == "linspace":
        idx = np.round(np.linspace(0, T - 1, num_steps)).astype(np.int64)
    elif spacing == "leading":
        idx = np.arange(num_steps, dtype=np.int64) * (T // num_steps)
    elif spacing == "trailing":
        idx = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: {SPACINGS}")
    return np.sort(np.unique(idx))[::-1].copy()


def time_pairs(schedule, num_steps: int, spacing: str, strength: float = 1.0):
    """(t, s) float32 arrays [N]: each step goes from t to s < t; the last s is 0.

    strength < 1 (image-to-image) keeps only the steps with t <= strength."""
    idx = timesteps(schedule.T, num_steps, spacing)
    t = (idx + 1.0) / schedule.T
    s = np.concatenate([t[1:], [0.0]])
    if strength < 1.0:
        keep = t <= strength + 1e-6
        if not keep.any():
            raise ValueError(f"strength {strength} leaves no sampling step; the lowest "
                             f"step starts at t={t.min():.4g}")
        t, s = t[keep], s[keep]
    return jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)


def sample_keys(key: jax.Array, batch: int, offset=0) -> jax.Array:
    """One key per sample: fold_in(key, offset + i)."""
    ids = jnp.arange(batch, dtype=jnp.uint32) + jnp.asarray(offset, jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def per_sample_normal(keys: jax.Array, shape: tuple, salt) -> jnp.ndarray:
    """Standard normal [B, *shape] with sample b's values from fold_in(keys[b], salt)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape))(keys)


def initial_noise(keys: jax.Array, shape: tuple, x_T=None) -> jnp.ndarray:
    """x_T: given, or N(0, I) per sample (salt 0; steps use salt step + 1)."""
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {x_T.shape}, expected {shape}")
        return x_T
    return per_sample_normal(keys, tuple(shape[1:]), 0)


def check_img2img(shape: tuple, x_T, x_init, strength: float) -> None:
    """Validates image-to-image arguments before anything is traced."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if x_init is None:
        if strength < 1.0:
            raise ValueError(f"strength={strength} < 1 needs an initial image x_init")
        return
    if x_T is not None:
        raise ValueError("give x_T (the start noise) or x_init (image-to-image), not both")
    if tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {x_init.shape}, expected {shape}")


def img2img_start(schedule, x_init: jnp.ndarray, t_start: float, keys: jax.Array,
                  shape: Optional[tuple] = None) -> jnp.ndarray:
    """q_sample(x_init, t_start) with sample b's noise from fold_in(keys[b], 0)."""
    if shape is not None and tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {x_init.shape}, expected {shape}")
    eps = per_sample_normal(keys, tuple(x_init.shape[1:]), 0)
    t = jnp.full((x_init.shape[0],), t_start, jnp.float32)
    return q_sample(schedule, x_init.astype(jnp.float32), t, eps)


def start_state(schedule, keys: jax.Array, shape: tuple, x_T=None, x_init=None,
                t_start=1.0) -> jnp.ndarray:
    """The sampler's state at its first time t_start: x_T (given or N(0, I)), or for
    image-to-image x_init noised to t_start."""
    if x_init is not None:
        return img2img_start(schedule, x_init, t_start, keys, shape)
    return initial_noise(keys, shape, x_T)
