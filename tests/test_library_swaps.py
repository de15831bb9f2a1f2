"""Library functions that replaced hand-written code give the hand-written results:
optax's tree norm and Polyak average (train step, EMA)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion.train.state import ema_decay, ema_update


def _tree(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)),
                     "bias": jax.random.normal(k2, (4,))},
            "dense": jax.random.normal(k3, (5, 7))}


def test_tree_norm_equals_hand_written_global_norm():
    g = _tree(jax.random.key(0))
    hand = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(float(optax.tree.norm(g)), hand, rtol=1e-6)


def test_ema_update_is_polyak_average_with_warmup_decay():
    ema, params = _tree(jax.random.key(1)), _tree(jax.random.key(2))
    for step, warmup in ((0, True), (5, True), (10_000, True), (3, False)):
        decay = ema_decay(jnp.asarray(step, jnp.int32), 0.999, warmup)
        want = (1 + step) / (10 + step) if warmup else 0.999
        np.testing.assert_allclose(float(decay), min(0.999, want), rtol=1e-6)
        out = ema_update(ema, params, decay)
        jax.tree.map(lambda o, e, p: np.testing.assert_allclose(
            o, float(decay) * e + (1 - float(decay)) * p, rtol=1e-5, atol=1e-6), out, ema, params)
