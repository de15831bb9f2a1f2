"""The train state every objective shares: one pytree, its optimizer, one update rule.

TrainState(step, params, opt_state, ema_params, rng, aux), where `aux` holds what an
objective other than plain diffusion needs (a consistency model's target net, a CD
teacher's params, a VAE's discriminator). It is initialised by shape first
(`jax.eval_shape`), which checks the model against the data shape in seconds, and the
same abstract state is the checkpoint restore target.

Every train step (diffusion, EDM, consistency CT / CD, the VAE) ends in
`apply_gradients`: one optimizer update and the EMA of the parameters, with the same
warm-up rule. Class labels (or captions) are dropped for classifier-free guidance by
`drop_labels`, and the per-example losses are reported in NUM_LOSS_BUCKETS noise-level
buckets.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.flatten_util import ravel_pytree

from diffusion import losses
from diffusion.models import init_params

NUM_LOSS_BUCKETS = 4


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # typed key; the step's key is fold_in(rng, step)
    aux: Any = flax.struct.field(default_factory=dict)  # objective-specific state


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    warmup = int(optim.warmup_steps)
    decay_steps = max(num_steps - warmup, 1)
    end = optim.lr * optim.end_lr_factor
    if optim.decay == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.decay == "cosine":
        after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_factor)
    elif optim.decay == "linear":
        after = optax.linear_schedule(optim.lr, end, decay_steps)
    else:
        raise ValueError(f"unknown optim.decay {optim.decay!r}; known: constant, cosine, linear")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def flat_updates(optim: ml_collections.ConfigDict) -> bool:
    """optim.flatten; False for a run's config.json written before the key existed."""
    return bool(optim.get("flatten", False))


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                   frozen: tuple[str, ...] = ()):
    """AdamW with warm-up and decay, after global-norm gradient clipping. frozen: names
    of top-level parameter subtrees (e.g. "text", a frozen text encoder) whose updates
    are zero, so neither the gradients nor AdamW's weight decay move them.

    optim.flatten: clipping and AdamW see every parameter as one vector (optax.flatten;
    the moments are then one vector each). Both are elementwise or global, so the
    numbers are the same; the compiled step has a few large kernels instead of a few
    per parameter, which halves a small model's compile time on CPU (the tests)."""
    lr = learning_rate_schedule(optim, num_steps)
    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay))
    tx = optax.chain(*parts)
    if flat_updates(optim):
        tx = optax.flatten(tx)
    if frozen:
        tx = optax.chain(tx, optax.masked(optax.set_to_zero(),
                                          lambda params: {k: k in frozen for k in params}))
    return tx, lr


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA rate at `step`; with warm-up, min(decay, (1 + k) / (10 + k))."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    k = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + k) / (10.0 + k))


def ema_update(ema: Any, params: Any, decay: jax.Array, flat: bool = False) -> Any:
    """decay * ema + (1 - decay) * params, leaf by leaf (optax's Polyak average); with
    `flat`, on the trees raveled into one vector each (the same numbers, one kernel:
    optim.flatten)."""
    if not flat:
        return optax.incremental_update(params, ema, 1.0 - decay)
    flat_ema, unravel = ravel_pytree(ema)
    return unravel(optax.incremental_update(ravel_pytree(params)[0], flat_ema, 1.0 - decay))


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation, *,
                    ema_rate: float, ema_warmup: bool, flat: bool = False
                    ) -> tuple[TrainState, jax.Array]:
    """(state after one optimizer step and its EMA update, the EMA decay used).

    The step counter advances by one; `aux` is left as it is (an objective updates
    its own part of it from the returned state's params). flat: the EMA on raveled
    trees (optim.flatten, which also makes `tx` work on one vector)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema_rate, ema_warmup)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_update(state.ema_params, params, decay, flat))
    return new_state, decay


def grad_norm(grads: Any, flat: bool = False) -> jax.Array:
    """The global norm of a gradient tree (of its raveled vector with `flat`: one
    reduction instead of one per leaf)."""
    return optax.tree.norm(ravel_pytree(grads)[0] if flat else grads)


def step_metrics(state: TrainState, loss: jax.Array, grads: Any, lr_fn: optax.Schedule,
                 decay: jax.Array, flat: bool = False) -> dict:
    """The metrics every step reports: loss, grad norm, learning rate, EMA decay (of the
    step that `state`, the state before the update, is at)."""
    return {"loss": loss, "grad_norm": grad_norm(grads, flat),
            "learning_rate": lr_fn(state.step), "ema_decay": decay}


def loss_buckets(per_example: jnp.ndarray, u: jnp.ndarray) -> dict:
    """{"loss_t<b>": mean of per_example [B] over the examples whose noise level u [B] in
    (0, 1] falls in bucket b of NUM_LOSS_BUCKETS equal parts (b = 0: the least noise)}."""
    means = losses.bucket_means(per_example, u, NUM_LOSS_BUCKETS)
    return {f"loss_t{b}": means[b] for b in range(NUM_LOSS_BUCKETS)}


def gradient_step(state: TrainState, loss_fn: Callable, tx: optax.GradientTransformation,
                  lr_fn: optax.Schedule, *, ema_rate: float, ema_warmup: bool,
                  flat: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on loss_fn(params) -> (mean loss, (per-example loss [B],
    noise level u [B] in (0, 1])): (new state, the step's metrics with loss buckets)."""
    (loss, (per_example, u)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, decay = apply_gradients(state, grads, tx, ema_rate=ema_rate,
                                       ema_warmup=ema_warmup, flat=flat)
    metrics = step_metrics(state, loss, grads, lr_fn, decay, flat)
    return new_state, dict(metrics, **loss_buckets(per_example, u))


def same_shapes(a: Any, b: Any) -> bool:
    """Whether two parameter trees have one structure and equal leaf shapes."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def placed_copy(tree: Any, sharding: Any) -> Any:
    """`tree` (host or device arrays) copied onto `sharding`, a buffer of its own per
    leaf: the train step donates the whole state, so no two state fields may share one."""
    return jax.tree.map(lambda a, s: jax.device_put(jnp.array(a), s), tree, sharding)


def restart_from(state: TrainState, params: Any, sharding: Any,
                 tx: optax.GradientTransformation) -> TrainState:
    """`state` with params and EMA both set to `params`, placed as `sharding` (the
    state's sharding) says, and a fresh optimizer state: how a run starts from weights
    it did not train (a teacher, a pretrained encoder)."""
    new = placed_copy(params, sharding.params)
    opt_state = jax.jit(tx.init, out_shardings=sharding.opt_state)(new)
    return state.replace(params=new, ema_params=placed_copy(params, sharding.ema_params),
                         opt_state=opt_state)


def drop_labels(key: jax.Array, y: jnp.ndarray, p: float, null: Any = -1) -> jnp.ndarray:
    """Replaces each row of y by `null` with probability p, for classifier-free guidance:
    labels y [B] by the null label -1, or captions y [B, L] (token ids) by the empty
    prompt's ids null [L] ("caption dropout"). Row b is dropped where
    uniform(key, [B])[b] < p, so labels and captions drop alike for one key."""
    if p <= 0:
        return y
    drop = jax.random.uniform(key, y.shape[:1]) < p
    return jnp.where(drop.reshape(drop.shape + (1,) * (y.ndim - 1)),
                     jnp.asarray(null, y.dtype), y)


def init_state(model, tx: optax.GradientTransformation, key: jax.Array, image_shape: tuple,
               num_classes: int) -> TrainState:
    """Initialises params on a batch of one; call under eval_shape or jit."""
    k_init, k_state = jax.random.split(key)
    params = init_params(model, k_init, image_shape, num_classes)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params, rng=k_state)

