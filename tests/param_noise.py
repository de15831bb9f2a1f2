"""A shared test helper: parameters moved by numpy noise. Eager jax.random and jnp would
compile a few kernels per parameter shape; numpy compiles nothing."""
import jax
import numpy as np


def perturbed(tree, scale: float, seed: int):
    """Every leaf of `tree` plus scale * standard normal noise (float32, drawn in leaf
    order from numpy's default_rng(seed)), as numpy arrays."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: np.asarray(a) + scale * rng.standard_normal(np.shape(a), np.float32), tree)
