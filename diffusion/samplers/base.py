"""What every sampler shares: time-step spacings and per-sample noise.

A sampler is a pure function
    sample(denoiser, key, shape, num_steps, *, y=None, guidance=None, x_T=None,
           sample_offset=0, x_init=None, strength=1.0, mask=None, callback=None,
           return_intermediates=False, **options) -> x0 [B, H, W, C]
(with return_intermediates: (x0, Trajectory))
that runs its whole loop inside one `lax.scan`, so one `jax.jit` around it compiles
the loop once. The noise of sample i is drawn from fold_in(key, sample_offset + i) alone,
so a sample does not change with batch size or device count.

Image-to-image (`x_init`, `strength` in (0, 1]; the samplers built on `plan`): a sampler
keeps only the steps of its grid with t <= strength and starts from q_sample(x_init,
t_first), t_first the first kept time, with the same per-sample noise (salt 0) that x_T
would have used. `check_img2img` and `img2img_start` are the shared pieces.

Inpainting (`mask` [B or 1, ..., C or 1], 1 = keep the pixel of the known image x_init):
at every evaluation the known pixels of the state are replaced by x_init noised to that
evaluation's time, with fresh per-sample noise (salt KNOWN_SALT + evaluation), and the
result's known pixels are x_init itself (`paste_known`, `paste_final`). With strength 1
the start is x_T (given or drawn), so an all-zeros mask is plain sampling. Pasting alone
harmonises the two regions weakly; DDPM and DDIM take `inpaint_resample` = R (RePaint,
Lugmayr et al. 2022): each step runs R + 1 times, re-noised from s back to t between
rounds (`run_steps`, `renoise`), NFE (R + 1) N.

The arguments above travel together as one `SampleInputs`. `Trajectory` is what a
sampler returns beside its result with return_intermediates=True, and `report` calls a
user's callback(i, t, x, x0) at each evaluation (k-diffusion's callback, made from
inside the compiled loop with jax.debug.callback: calls are unordered, i says which).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.forward_process import q_sample

SPACINGS = ("linspace", "leading", "trailing", "iddpm")
PREV_TIMESTEPS = ("next", "stride")


def _iddpm_indices(T: int, num_steps: int) -> np.ndarray:
    """improved-diffusion's space_timesteps(T, str(N)) for one section: N indices from 0
    to T - 1 at the fractional stride (T - 1) / (N - 1), accumulated in floating point
    and rounded half to even exactly as the reference code does (DiT samples with it)."""
    stride = (T - 1) / (num_steps - 1) if num_steps > 1 else 1.0
    cur, taken = 0.0, []
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += stride
    return np.asarray(taken, np.int64)


def timesteps(T: int, num_steps: int, spacing: str = "trailing",
              steps_offset: int = 0) -> np.ndarray:
    """Descending discrete indices in [0, T-1] visited by an N-step sampler.

    linspace: round(linspace(0, T-1, N)); leading: k * (T // N) + steps_offset (DDIM's
    original; Stable Diffusion's configs use steps_offset = 1); trailing: round(T - k T / N)
    - 1, which always starts at T-1 (Lin et al. 2024); iddpm: improved-diffusion's
    respacing `space_timesteps(T, "N")` (the DiT / ADM samplers), round(k (T-1) / (N-1))
    with the reference code's accumulated stride, 0 and T-1 included. steps_offset applies
    to leading only, as in diffusers.
    """
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset={steps_offset} applies to leading spacing only (as in "
                         f"diffusers), got spacing {spacing!r}")
    if spacing == "linspace":
        idx = np.round(np.linspace(0, T - 1, num_steps)).astype(np.int64)
    elif spacing == "leading":
        idx = np.arange(num_steps, dtype=np.int64) * (T // num_steps) + int(steps_offset)
    elif spacing == "trailing":
        # From k = 0..N-1 exactly: np.arange(T, 0, -T / N) (diffusers' form) gains an
        # element near 0 from float error for some N (61 of 1000), which became index -1.
        idx = np.round(T - np.arange(num_steps) * (T / num_steps)).astype(np.int64) - 1
    elif spacing == "iddpm":
        idx = _iddpm_indices(T, num_steps)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: {SPACINGS}")
    if not 0 <= idx.min() <= idx.max() <= T - 1:
        raise ValueError(f"steps_offset={steps_offset} moves {spacing} timesteps out of "
                         f"[0, {T - 1}]")
    return np.sort(np.unique(idx))[::-1].copy()


def step_times(schedule, num_steps: int, spacing: str = "trailing", *,
               steps_offset: int = 0, set_alpha_to_one: bool = True,
               prev_timestep: str = "next") -> tuple[np.ndarray, np.ndarray]:
    """(t, s) float64 [N]: the continuous times (i + 1) / T of the visited indices i and
    where each step ends, for the DDIM-style samplers (DDPM, DDIM, PLMS).

    prev_timestep "next": each step ends where the next begins; "stride": at index
    i - T // N whatever the grid (diffusers' DDIMScheduler / PNDMScheduler, which differs
    from "next" only where the grid's stride is not T // N, e.g. linspace). A step whose
    end falls below index 0 ends at t = 0 (alpha_bar = 1, set_alpha_to_one=True, ours) or
    at the first trained step t = 1/T (set_alpha_to_one=False, Stable Diffusion's setting).
    """
    if prev_timestep not in PREV_TIMESTEPS:
        raise ValueError(f"unknown prev_timestep {prev_timestep!r}; known: {PREV_TIMESTEPS}")
    T = schedule.T
    idx = timesteps(T, num_steps, spacing, steps_offset)
    final = 0.0 if set_alpha_to_one else 1.0 / T
    t = (idx + 1.0) / T
    if prev_timestep == "next":
        s = np.concatenate([t[1:], [final]])
    else:
        s_idx = idx - T // num_steps
        s = np.where(s_idx >= 0, (s_idx + 1.0) / T, final)
    return t, s


def time_pairs(schedule, num_steps: int, spacing: str, strength: float = 1.0, **grid):
    """(t, s) float32 arrays [N] of `step_times(schedule, num_steps, spacing, **grid)`.

    strength < 1 (image-to-image) keeps only the steps with t <= strength."""
    t, s = step_times(schedule, num_steps, spacing, **grid)
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


KNOWN_SALT = 1 << 30  # noise of the known pixels at evaluation k: salt KNOWN_SALT + k
RENOISE_SALT = 1 << 31  # RePaint's jump back after evaluation k: salt RENOISE_SALT + k


class SampleInputs(NamedTuple):
    """What one sampling call is conditioned on, beside the model and the time grid:
    labels y [B] and guidance weight, the start noise x_T, the index of the first sample
    (its noise keys), the known / initial image x_init with the image-to-image strength,
    and the inpainting mask (1 = keep x_init's pixel)."""
    y: Any = None
    guidance: Any = None
    x_T: Any = None
    sample_offset: Any = 0
    x_init: Any = None
    strength: float = 1.0
    mask: Any = None

    def check(self, shape: tuple) -> None:
        check_img2img(shape, self.x_T, self.x_init, self.strength, self.mask)

    @property
    def img2img(self) -> bool:
        """Whether the start is x_init noised (else x_T, given or drawn)."""
        return self.x_init is not None and (self.mask is None or self.strength < 1.0)


class Trajectory(NamedTuple):
    """A sampler's evaluations: times t [M], states x [M, B, ...] and the model's x0
    [M, B, ...] there (return_intermediates=True)."""
    t: jnp.ndarray
    x: jnp.ndarray
    x0: jnp.ndarray


def check_img2img(shape: tuple, x_T, x_init, strength: float, mask=None) -> None:
    """Validates image-to-image and inpainting arguments before anything is traced."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if mask is not None:
        if x_init is None:
            raise ValueError("an inpainting mask needs the known image x_init")
        m = tuple(mask.shape)
        if len(m) != len(shape) or any(a not in (1, b) for a, b in zip(m, shape)):
            raise ValueError(f"mask has shape {m}; it must broadcast to the samples' "
                             f"{tuple(shape)} (e.g. [1, H, W, 1]), 1 = keep x_init's pixel")
    if x_init is None:
        if strength < 1.0:
            raise ValueError(f"strength={strength} < 1 needs an initial image x_init")
        return
    if x_T is not None and (mask is None or strength < 1.0):
        raise ValueError("give x_T (the start noise) or x_init (image-to-image), not both")
    if tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {x_init.shape}, expected {shape}")


def paste_known(schedule, x: jnp.ndarray, t, inputs: SampleInputs, keys: jax.Array,
                k) -> jnp.ndarray:
    """Inpainting: x [B, ...] at time t with its known pixels replaced by x_init noised to
    t (noise salt KNOWN_SALT + k); x itself without a mask."""
    if inputs.mask is None:
        return x
    eps = per_sample_normal(keys, tuple(x.shape[1:]), jnp.uint32(KNOWN_SALT) + k)
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    known = q_sample(schedule, inputs.x_init.astype(jnp.float32), tb, eps)
    m = jnp.asarray(inputs.mask, jnp.float32)
    return m * known + (1.0 - m) * x


def paste_final(x: jnp.ndarray, inputs: SampleInputs) -> jnp.ndarray:
    """Inpainting: the result keeps x_init's known pixels exactly."""
    if inputs.mask is None:
        return x
    m = jnp.asarray(inputs.mask, jnp.float32)
    return m * inputs.x_init.astype(jnp.float32) + (1.0 - m) * x


def report(callback: Optional[Callable], i, t, x, x0) -> None:
    """callback(i, t, x, x0) from inside a compiled loop (host values), if given."""
    if callback is not None:
        jax.debug.callback(callback, i, t, x, x0)


def img2img_start(schedule, x_init: jnp.ndarray, t_start: float, keys: jax.Array,
                  shape: Optional[tuple] = None) -> jnp.ndarray:
    """q_sample(x_init, t_start) with sample b's noise from fold_in(keys[b], 0)."""
    if shape is not None and tuple(x_init.shape) != tuple(shape):
        raise ValueError(f"x_init has shape {x_init.shape}, expected {shape}")
    eps = per_sample_normal(keys, tuple(x_init.shape[1:]), 0)
    t = jnp.full((x_init.shape[0],), t_start, jnp.float32)
    return q_sample(schedule, x_init.astype(jnp.float32), t, eps)


def start_from(schedule, keys: jax.Array, shape: tuple, inputs: SampleInputs,
               t_start) -> jnp.ndarray:
    """The state at t_start for these inputs: x_init noised for image-to-image, else
    start_std(t_start) x_T (x_T itself on a VP path; `paths.GaussianPath.start_std`;
    inpainting at strength 1 starts from noise as plain sampling does)."""
    if inputs.img2img:
        return img2img_start(schedule, inputs.x_init, t_start, keys, shape)
    return scaled_noise(schedule, initial_noise(keys, shape, inputs.x_T), t_start)


def scaled_noise(schedule, x_T: jnp.ndarray, t_start) -> jnp.ndarray:
    """x_T ~ N(0, I) -> the start state start_std(t_start) x_T of a sampler at t_start
    (unchanged on variance-preserving paths)."""
    if getattr(schedule, "variance_preserving", True):
        return x_T
    return jnp.asarray(schedule.start_std(t_start), jnp.float32) * x_T


def start_state(schedule, keys: jax.Array, shape: tuple, x_T=None, x_init=None,
                t_start=1.0) -> jnp.ndarray:
    """The sampler's state at its first time t_start: x_T (given or N(0, I)), or for
    image-to-image x_init noised to t_start."""
    if x_init is not None:
        return img2img_start(schedule, x_init, t_start, keys, shape)
    return scaled_noise(schedule, initial_noise(keys, shape, x_T), t_start)


def renoise(schedule, x_s: jnp.ndarray, s, t, keys: jax.Array, k) -> jnp.ndarray:
    """RePaint's jump back: x_t ~ q(x_t | x_s) for s < t, noise salt RENOISE_SALT + k."""
    a, var = schedule.transition(jnp.reshape(s, (1,)), jnp.reshape(t, (1,)))
    z = per_sample_normal(keys, tuple(x_s.shape[1:]), jnp.uint32(RENOISE_SALT) + k)
    return a[0] * x_s + jnp.sqrt(var[0]) * z


def run_steps(update: Callable, x: jnp.ndarray, t_all, s_all, *, resample: int = 0,
              jump_back: Optional[Callable] = None, return_intermediates: bool = False):
    """The loop of a sampler that steps t -> s itself (DDPM, DDIM), as one lax.scan.

    update(x, k, t, s) -> (x_s, (x, x0)): evaluation k at time t and the step to s.
    resample = R > 0: each step runs R + 1 times, jump_back(x_s, s, t, k) between rounds;
    evaluation k = step (R + 1) + round. Returns (x, Trajectory or None)."""
    R = int(resample)
    if R < 0:
        raise ValueError(f"inpaint_resample must be >= 0, got {R}")
    keep = lambda rec: rec if return_intermediates else None  # noqa: E731

    def step(x, inp):
        n, t, s = inp
        if R == 0:
            x, rec = update(x, n, t, s)
            return x, keep(rec)

        def round_(x, j):
            k = n * (R + 1) + j
            x_s, rec = update(x, k, t, s)
            return jnp.where(j < R, jump_back(x_s, s, t, k), x_s), keep(rec)
        return jax.lax.scan(round_, x, jnp.arange(R + 1, dtype=jnp.uint32))

    steps = jnp.arange(t_all.shape[0], dtype=jnp.uint32)
    x, path = jax.lax.scan(step, x, (steps, t_all, s_all))
    if not return_intermediates:
        return x, None
    xs, x0s = path
    if R:
        xs, x0s = (a.reshape((-1,) + a.shape[2:]) for a in (xs, x0s))
    return x, Trajectory(jnp.repeat(t_all, R + 1), xs, x0s)
