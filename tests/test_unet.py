"""Tests of the DDPM/ADM U-Net: parameter count, shapes, input errors, conditioning,
dropout, remat and bf16 activations. Models are tiny (ch=16, two levels, 8x8 images)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models.unet import UNet

# DDPM paper's CIFAR-10 network: "35.7M" parameters; 35,746,307 in the reference code.
DDPM_CIFAR10_PARAMS = 35_746_307

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


def count_params(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_init(model: UNet, x_shape, **kw):
    """Parameter shapes without running or compiling anything."""
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(x_shape[:1], jnp.float32)
    return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t, **kw), x, t)


def random_params(model: UNet, x_shape, seed: int = 1, **kw):
    """Random parameters of the right shapes, built without running `init`.

    Every parameter is live (unlike at init, where conv_out and each residual branch's
    last layer are zero), so conditioning and dropout visibly change the output; and
    no init graph is compiled, which keeps the tests fast.
    """
    shapes = abstract_init(model, x_shape, **kw)
    rng = np.random.default_rng(seed)  # numpy: no per-shape compiles

    def fill(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        is_norm_scale = getattr(path[-1], "key", None) == "scale"
        return jnp.asarray(1.0 + noise if is_norm_scale else noise)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def key(seed: int) -> jax.Array:
    # 'rbg' keys: XLA on CPU compiles the default threefry hash slowly, and init draws
    # one stream per parameter.
    return jax.random.key(seed, impl="rbg")


@functools.cache
def jit_apply(model: UNet):
    """One compiled apply per model (tests share them) and call signature."""
    return jax.jit(model.apply, static_argnames=("train",))


def inputs(shape=(2, 8, 8, 3), seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape)
    t = jax.random.uniform(kt, shape[:1], maxval=1000.0)
    return x, t


def test_ddpm_cifar10_parameter_count():
    model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1)
    n = count_params(abstract_init(model, (1, 32, 32, 3)))
    assert abs(n - DDPM_CIFAR10_PARAMS) / DDPM_CIFAR10_PARAMS < 0.005, n
    assert n == DDPM_CIFAR10_PARAMS  # same layout as DDPM's, so exactly equal


def test_output_shapes():
    # Attention placement and channels follow the input, so check several inputs.
    for shape, out_channels, expected in [
        ((2, 8, 8, 3), None, 3),
        ((1, 8, 16, 1), None, 1),
        ((3, 16, 8, 4), 8, 8),  # learned variance: 2 * C outputs
    ]:
        model = UNet(**TINY, out_channels=out_channels)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
        out = jax.eval_shape(
            lambda x, t: model.apply(model.init(jax.random.key(0), x, t), x, t), x, t)
        assert out.shape == shape[:3] + (expected,)
        assert out.dtype == jnp.float32


def test_init_is_float32_and_output_starts_at_zero():
    """A real init: conv_out is zero-initialised, so the initial prediction is 0."""
    model = UNet(**TINY, num_classes=4)  # as in the label test: shares its compile
    x, t = inputs()
    params = jax.jit(model.init)(key(0), x, t)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert params["params"]["label_emb"]["table"]["embedding"].shape == (5, 4 * 16)
    out = jit_apply(model)(params, x, t, jnp.array([1, -1]))
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, 0.0)


def test_adm_options_and_remat():
    """ADM switches (FiLM, resample in ResBlocks, head_dim) run; remat changes nothing."""
    kw = dict(TINY, scale_shift_norm=True, resblock_updown=True, head_dim=8, dropout=0.5)
    x, t = inputs()
    plain, remat = UNet(**kw), UNet(**kw, remat=True)
    params = random_params(plain, x.shape)
    assert jax.tree.structure(params) == jax.tree.structure(abstract_init(remat, x.shape))
    rngs = {"dropout": key(5)}
    out = jit_apply(plain)(params, x, t, train=True, rngs=rngs)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(jit_apply(remat)(params, x, t, train=True, rngs=rngs), out,
                               rtol=1e-5, atol=1e-5)
    # The rematerialised blocks differentiate (traced, not compiled: XLA CPU compiles
    # of backward passes are slow, and the numbers are jax.checkpoint's business).
    loss = lambda p: jnp.mean(remat.apply(p, x, t, train=True, rngs=rngs) ** 2)
    grads = jax.eval_shape(jax.grad(loss), params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_bad_inputs_raise_clear_errors():
    model = UNet(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match=r"6x6 is not divisible by 4"):
        abstract_init(model, (1, 6, 6, 3))
    with pytest.raises(ValueError, match=r"8x10 is not divisible by 4"):
        abstract_init(model, (1, 8, 10, 3))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        abstract_init(model, (8, 8, 3))
    with pytest.raises(ValueError, match="unconditional"):
        abstract_init(model, (2, 8, 8, 3), y=jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="t of shape"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)),
                                          jnp.zeros((3,))))
    with pytest.raises(ValueError, match="heads do not divide"):
        abstract_init(UNet(**TINY, num_heads=3), (1, 8, 8, 3))


def test_label_conditioning_and_null_label():
    model = UNet(**TINY, num_classes=4)
    x, t = inputs()
    params = random_params(model, x.shape)
    apply = jit_apply(model)
    out_a = apply(params, x, t, jnp.array([0, 1]))
    out_b = apply(params, x, t, jnp.array([2, 3]))
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3
    out_neg = apply(params, x, t, jnp.array([-1, -5]))
    out_null = apply(params, x, t, jnp.array([4, 4]))
    out_none = apply(params, x, t)
    np.testing.assert_allclose(out_neg, out_null, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out_none, out_null, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(out_null - out_a))) > 1e-3
    # The time embedding matters too.
    assert float(jnp.max(jnp.abs(apply(params, x, t + 100.0) - out_none))) > 1e-3


def test_dropout_only_in_training():
    model = UNet(**TINY, dropout=0.5)
    x, t = inputs()
    params = random_params(model, x.shape)
    apply = jit_apply(model)
    eval_a = apply(params, x, t, train=False)
    eval_b = apply(params, x, t, train=False, rngs={"dropout": key(7)})
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(params, x, t, train=True, rngs={"dropout": key(2)})
    train_b = apply(params, x, t, train=True, rngs={"dropout": key(3)})
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3


def test_bfloat16_activations_match_float32():
    x, t = inputs()
    model16, model32 = UNet(**TINY, dtype=jnp.bfloat16), UNet(**TINY)
    assert all(p.dtype == jnp.float32
               for p in jax.tree.leaves(abstract_init(model16, x.shape)))
    params = random_params(model32, x.shape)
    out16 = jit_apply(model16)(params, x, t)
    out32 = jit_apply(model32)(params, x, t)
    assert out16.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out16)))
    # Same network, lower precision: close but not identical.
    err = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
    assert 0 < err < 0.1, err
