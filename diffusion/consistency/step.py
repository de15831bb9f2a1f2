"""Train steps for EDM and consistency models: pure (state, batch) -> (state, metrics).

Like diffusion.train.step, randomness comes from fold_in(state.rng, step), so a step
gives the same result on one device or eight and a resumed run continues bit-for-bit.

Consistency step (CD and CT), per example: a pair index n, z ~ N(0, I),
x_{n+1} = x0 + sigma_{n+1} z and
    CT: x_n = x0 + sigma_n z                                        (same noise)
    CD: x_n = one Euler/Heun PF-ODE step of the teacher from x_{n+1} to sigma_n;
loss = lambda_n d(f_theta(x_{n+1}, sigma_{n+1}), stop_grad f_target(x_n, sigma_n)).
The target network's params are state.aux['target'] (EMA of the online params with
rate mu, updated after each optimizer step), or the online params themselves when
the spec has no target network (iCT). Both networks run in training mode with the
same dropout key, as in the consistency-models code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.scipy.stats import norm

from diffusion import losses as diffusion_losses
from diffusion.consistency import losses as cm
from diffusion.consistency.edm import Precond, denoise, edm_loss, flax_net_fn
from diffusion.forward_process import expand
from diffusion.train.state import TrainState, ema_decay, ema_update
from diffusion.train.step import NUM_LOSS_BUCKETS, drop_labels

TARGET_SCHEDULES = ("constant", "ct", "none")

# (teacher_params, x_ve [B, H, W, C], sigma [B], y [B] or None) -> x0 [B, H, W, C]
TeacherFn = Callable[[Any, jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class ConsistencySpec:
    """Hyperparameters of a consistency objective (see diffusion.consistency.losses)."""
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
        cm._check(self.curriculum, cm.CURRICULA, "consistency.curriculum")
        cm._check(self.index_sampling, cm.INDEX_SAMPLINGS, "consistency.index_sampling")
        cm._check(self.weighting, cm.WEIGHTINGS, "consistency.weighting")
        cm._check(self.distance, cm.DISTANCES, "consistency.distance")
        cm._check(self.ode_solver, cm.ODE_SOLVERS, "consistency.ode_solver")
        cm._check(self.target_schedule, TARGET_SCHEDULES, "consistency.target_ema_schedule")
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
        return cm.max_num_scales(self.curriculum, self.num_scales, self.s1)

    def num_scales_at(self, step: jnp.ndarray) -> jnp.ndarray:
        return cm.num_scales_at(step, self.curriculum, self.total_steps, self.num_scales,
                                self.s0, self.s1)

    def mu_at(self, num_scales: jnp.ndarray) -> jnp.ndarray:
        if self.target_schedule == "ct":
            return cm.ct_target_ema(num_scales, self.s0, self.target_ema)
        return jnp.asarray(self.target_ema if self.has_target_net else 0.0, jnp.float32)


def _apply_update(tx, state: TrainState, grads, ema_rate: float, ema_warmup: bool):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema_rate, ema_warmup)
    return params, opt_state, decay


def _bucket_metrics(metrics: dict, per_example: jnp.ndarray, u: jnp.ndarray) -> dict:
    buckets = diffusion_losses.bucket_means(per_example, u, NUM_LOSS_BUCKETS)
    for b in range(NUM_LOSS_BUCKETS):
        metrics[f"loss_t{b}"] = buckets[b]
    return metrics


def make_edm_train_step(model, tx: optax.GradientTransformation, lr_fn: optax.Schedule, *,
                        precond: Precond, p_mean: float, p_std: float, num_classes: int,
                        label_dropout: float, ema_rate: float, ema_warmup: bool) -> Callable:
    """EDM denoiser training; loss buckets are the 4 quartiles of the lognormal sigma."""

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_drop, k_label = jax.random.split(key, 3)
        x0 = batch["image"]
        y = drop_labels(k_label, batch["label"], label_dropout) if num_classes > 0 else None

        def loss_fn(params):
            net = flax_net_fn(model, params, train=True, dropout_key=k_drop)
            d_fn = lambda x, sigma: denoise(net, x, sigma, y, precond)
            per_example, sigma = edm_loss(d_fn, x0, k_loss, p_mean=p_mean, p_std=p_std,
                                          sigma_data=precond.sigma_data)
            return jnp.mean(per_example), (per_example, sigma)

        (loss, (per_example, sigma)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        params, opt_state, decay = _apply_update(tx, state, grads, ema_rate, ema_warmup)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, decay))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": lr_fn(state.step), "ema_decay": decay}
        u = norm.cdf((jnp.log(sigma) - p_mean) / p_std)  # equal-probability buckets
        return new_state, _bucket_metrics(metrics, per_example, jnp.clip(u, 1e-6, 1.0))

    return train_step


def make_consistency_train_step(model, tx: optax.GradientTransformation,
                                lr_fn: optax.Schedule, *, spec: ConsistencySpec,
                                precond: Precond, num_classes: int, label_dropout: float,
                                ema_rate: float, ema_warmup: bool,
                                teacher_fn: Optional[TeacherFn] = None) -> Callable:
    """CT when teacher_fn is None, else CD with teacher params in state.aux['teacher'].

    Loss buckets: n / (N - 1) in quarters (low to high noise).
    """
    if not precond.consistency:
        raise ValueError("consistency training needs Precond(consistency=True)")

    def f(params, x, sigma, y, k_drop):
        net = flax_net_fn(model, params, train=True, dropout_key=k_drop)
        return denoise(net, x, sigma, y, precond)

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        k_idx, k_z, k_drop, k_label = jax.random.split(key, 4)
        x0 = batch["image"]
        b = x0.shape[0]
        y = drop_labels(k_label, batch["label"], label_dropout) if num_classes > 0 else None

        num_scales = spec.num_scales_at(state.step)
        n = cm.sample_index(k_idx, b, num_scales, spec.max_scales, method=spec.index_sampling,
                            sigma_min=spec.sigma_min, sigma_max=spec.sigma_max, rho=spec.rho,
                            p_mean=spec.index_p_mean, p_std=spec.index_p_std)
        grid = lambda i: cm.karras_sigma(i, num_scales, spec.sigma_min, spec.sigma_max,
                                         spec.rho)
        sigma_n, sigma_n1 = grid(n), grid(n + 1)
        z = jax.random.normal(k_z, x0.shape, jnp.float32)
        x_n1 = x0 + expand(sigma_n1, x0) * z
        if teacher_fn is None:
            x_n = x0 + expand(sigma_n, x0) * z
        else:
            teacher = state.aux["teacher"]
            t_denoise = lambda x, s: teacher_fn(teacher, x, s, y)
            x_n = cm.ode_step(spec.ode_solver, t_denoise, x_n1, sigma_n1, sigma_n)
        x_n = jax.lax.stop_gradient(x_n)
        target_params = state.aux["target"] if spec.has_target_net else state.params
        f_target = jax.lax.stop_gradient(f(target_params, x_n, sigma_n, y, k_drop))
        weight = cm.pair_weight(spec.weighting, sigma_n, sigma_n1)

        def loss_fn(params):
            f_online = f(params, x_n1, sigma_n1, y, k_drop)
            per_example = weight * cm.distance(spec.distance, f_online, f_target, spec.huber_c)
            return jnp.mean(per_example), per_example

        (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        params, opt_state, decay = _apply_update(tx, state, grads, ema_rate, ema_warmup)
        mu = spec.mu_at(num_scales)
        aux = dict(state.aux)
        if spec.has_target_net:
            aux["target"] = ema_update(state.aux["target"], params, mu)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_update(state.ema_params, params, decay),
                                  aux=aux)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": lr_fn(state.step), "ema_decay": decay,
                   "num_scales": num_scales.astype(jnp.float32), "target_ema": mu}
        u = (n + 1).astype(jnp.float32) / (num_scales - 1).astype(jnp.float32)
        return new_state, _bucket_metrics(metrics, per_example, u)

    return train_step
