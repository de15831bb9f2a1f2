"""Tests of the DiT denoiser: paper parameter counts and GFLOPs of all 12 variants (by
shape only, nothing compiled), adaLN-Zero init, conditioning, labels, errors, and the
scanned-blocks layout (outputs, gradients, FLOPs equal to the unrolled model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models.dit import (DIT_VARIANTS, DiT, dit_variant, patchify, scan_blocks_for,
                                  stack_blocks, unpatchify, unstack_blocks)
from diffusion.models.flops import dit_forward_macs, forward_flops

from param_noise import perturbed

# DiT paper (Peebles & Xie 2023), 256x256 images = 32x32x4 latents, learn_sigma, 1000
# classes. Params in millions (same for every patch size), forward "Gflops" =
# 1e9 multiply-adds.
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}
PAPER_GFLOPS = {"S/2": 6.06, "B/2": 23.01, "L/2": 80.71, "XL/2": 118.64,
                "S/4": 1.41, "B/4": 5.56, "L/4": 19.70, "XL/4": 29.05,
                "S/8": 0.36, "B/8": 1.42, "L/8": 5.01, "XL/8": 7.39}

X = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
T = jax.ShapeDtypeStruct((1,), jnp.float32)
Y = jax.ShapeDtypeStruct((1,), jnp.int32)


def paper_model(variant: str) -> DiT:
    return DiT.from_variant(variant, input_size=32, in_channels=4, num_classes=1000,
                            learn_sigma=True)


def n_params(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", DIT_VARIANTS)
def test_params_and_gflops_match_paper(variant):
    # One init by shape per variant serves both counts (tracing XL's 28 blocks is ~1 s).
    model = paper_model(variant)
    shapes = jax.eval_shape(model.init, jax.random.key(0), X, T, Y)
    n = n_params(shapes)
    assert abs(n / (PAPER_PARAMS_M[variant.split("/")[0]] * 1e6) - 1) < 0.01, (variant, n)
    if variant == "XL/2":
        # The official count (675,129,632) includes the frozen 256 x 1152 pos_embed
        # buffer, which here is a constant, not a parameter.
        assert n + 256 * 1152 == 675_129_632

    xla_macs = forward_flops(model, shapes, (1, 32, 32, 4)) / 2  # lowered only
    cfg = dit_variant(variant)
    cfg.pop("num_heads")
    analytic = dit_forward_macs(32, in_channels=4, learn_sigma=True, **cfg)
    paper = PAPER_GFLOPS[variant] * 1e9
    assert abs(xla_macs / paper - 1) < 0.01, (variant, xla_macs / 1e9)
    assert abs(analytic / paper - 1) < 0.01, (variant, analytic / 1e9)
    # XLA also counts element-wise work, so it lies a little above the matmuls.
    assert 0 <= xla_macs / analytic - 1 < 0.01


def test_flops_scale_with_batch_and_accept_real_params():
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                num_heads=2)
    x = jnp.zeros((1, 8, 8, 4))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,)))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    f1 = forward_flops(model, variables, (1, 8, 8, 4))
    f3 = forward_flops(model, None, (3, 8, 8, 4))
    assert f1 > 2 * dit_forward_macs(8, 2, 4, 32, 2)
    # the t-frequency table is shared by the batch, so not exactly 3x
    assert f3 == pytest.approx(3 * f1, rel=1e-3)
    # a cuDNN-attention model is counted through the XLA attention it replaces
    fused = model.clone(dtype=jnp.bfloat16, attention_impl="cudnn")
    bf16 = model.clone(dtype=jnp.bfloat16)
    assert forward_flops(fused, None, (1, 8, 8, 4)) == forward_flops(bf16, None, (1, 8, 8, 4))


# ------------------------------------------------------------ a tiny model, compiled

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
            num_heads=2, num_classes=5)


@pytest.fixture(scope="module")
def tiny():
    model = DiT(**TINY, learn_sigma=True)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3), np.float32)
    t = np.array([3.0, 700.0], np.float32)
    y = np.array([0, 4], np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x, t, y)
    apply = jax.jit(model.apply)
    return model, variables, apply, x, t, y


def test_fresh_model_outputs_zeros_with_2c_channels(tiny):
    model, variables, apply, x, t, y = tiny
    out = apply(variables, x, t, y)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    # the label table has num_classes + 1 rows; row num_classes is the null class
    assert variables["params"]["y_embed"]["table"]["embedding"].shape == (6, 32)


def test_conditioning_changes_output_once_perturbed(tiny):
    model, variables, apply, x, t, y = tiny
    v = perturbed(variables, 0.3, seed=2)
    out = apply(v, x, t, y)
    assert np.abs(np.asarray(out)).mean() > 1e-3
    out_t = apply(v, x, t + 50.0, y)
    out_y = apply(v, x, t, (y + 1) % 5)
    assert np.abs(np.asarray(out_t - out)).max() > 1e-3
    assert np.abs(np.asarray(out_y - out)).max() > 1e-3
    # per-sample: changing sample 0's label leaves sample 1 alone
    out_y0 = apply(v, x, t, np.array([2, y[1]], np.int32))
    np.testing.assert_allclose(out_y0[1], out[1], atol=1e-6)


def test_negative_label_and_none_mean_null(tiny):
    model, variables, apply, x, t, y = tiny
    v = perturbed(variables, 0.3, seed=3)
    null = apply(v, x, t, np.array([5, 5], np.int32))
    np.testing.assert_allclose(apply(v, x, t, np.array([-1, -7], np.int32)), null, atol=1e-6)
    np.testing.assert_allclose(apply(v, x, t, None), null, atol=1e-6)
    assert np.abs(np.asarray(apply(v, x, t, y) - null)).max() > 1e-3


def test_remat_and_bf16_agree(tiny):
    model, variables, apply, x, t, y = tiny
    v = perturbed(variables, 0.3, seed=4)
    ref = apply(v, x, t, y)
    remat = DiT(**TINY, learn_sigma=True, remat=True)
    np.testing.assert_allclose(jax.jit(remat.apply)(v, x, t, y), ref, rtol=1e-5, atol=1e-5)
    bf16 = DiT(**TINY, learn_sigma=True, dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply)(v, x, t, y)
    assert out.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(out - ref)) / np.linalg.norm(np.asarray(ref))
    assert rel < 0.05, rel


def test_unconditional_and_scalar_t():
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1,
                num_heads=1)
    x = jax.ShapeDtypeStruct((2, 4, 4, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, T.update(shape=(2,)))
    assert "y_embed" not in variables["params"]
    out = jax.eval_shape(model.apply, variables, x, jax.ShapeDtypeStruct((), jnp.float32))
    assert out.shape == (2, 4, 4, 1)
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(model.apply, variables, x, T.update(shape=(2,)),
                       Y.update(shape=(2,)))


def test_patchify_roundtrip():
    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    tokens = np.asarray(patchify(x, 4))
    assert tokens.shape == (2, 4, 48)
    # token 1 is the top-right patch; its first entry is pixel (0, 4)
    np.testing.assert_array_equal(tokens[:, 1, :3], x[:, 0, 4])
    np.testing.assert_array_equal(np.asarray(unpatchify(tokens, 4, 2)), x)


def test_errors_before_compile():
    with pytest.raises(ValueError, match="patch size 3 does not divide image size 32"):
        DiT(input_size=32, patch_size=3, in_channels=4, hidden_size=64, depth=1,
            num_heads=2)
    with pytest.raises(ValueError, match="patch size 8 does not divide image size 12"):
        DiT.from_variant("S/8", input_size=12, in_channels=4)
    with pytest.raises(ValueError, match="'XXL/2'"):
        dit_variant("XXL/2")
    with pytest.raises(ValueError, match="'S/3'"):
        DiT.from_variant("S/3", input_size=24, in_channels=4)
    with pytest.raises(ValueError, match="num_heads"):
        DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1,
            num_heads=3)
    with pytest.raises(ValueError, match="cuDNN fused attention needs dtype"):
        DiT.from_variant("S/2", input_size=32, in_channels=4, attention_impl="cudnn")
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                num_heads=2)
    with pytest.raises(ValueError, match=r"\[B, 8, 8, 4\]"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 4)),
                       jnp.zeros((1,)))
    with pytest.raises(ValueError, match="t must have shape"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 4)),
                       jnp.zeros((3,)))


# ------------------------------------------------------------ scanned blocks

def test_scanned_blocks_equal_unrolled(tiny):
    model, variables, apply, x, t, y = tiny
    v = perturbed(variables, 0.3, seed=5)
    stacked = {"params": stack_blocks(v["params"])}
    scanned = DiT(**TINY, learn_sigma=True, scan_blocks=True)
    # the layout scanned init makes: block params stacked on a leading [depth] axis
    shapes = jax.eval_shape(scanned.init, jax.random.key(0), x, t, y)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, stacked)
    assert shapes["params"]["blocks"]["qkv"]["kernel"].shape == (2, 32, 96)
    assert not any(k.startswith("block_") for k in shapes["params"])
    ref = apply(v, x, t, y)
    for remat in (False, True):
        out = jax.jit(scanned.clone(remat=remat).apply)(stacked, x, t, y)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # gradients too, remat per block inside the scan
    def loss(m):
        return jax.jit(jax.grad(lambda p: (m.apply({"params": p}, x, t, y) ** 2).mean()))
    g_ref = stack_blocks(jax.tree.map(np.asarray, loss(model)(v["params"])))
    g = loss(scanned.clone(remat=True))(stacked["params"])
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max() + 1e-7)
    # layouts convert both ways, exactly
    back = unstack_blocks(stacked["params"])
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, v["params"]))
    with pytest.raises(ValueError, match="scanned layout"):
        stack_blocks(stacked["params"])
    with pytest.raises(ValueError, match="not the scanned layout"):
        unstack_blocks(v["params"])


def test_scanned_flops_and_params_match_unrolled():
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3,
               num_heads=2, num_classes=10)
    unrolled, scanned = DiT(**cfg), DiT(**cfg, scan_blocks=True)
    x = (2, 8, 8, 4)
    assert forward_flops(scanned, None, x) == forward_flops(unrolled, None, x)
    shapes = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros(x), jnp.zeros((2,)),
                            jnp.zeros((2,), jnp.int32))
    assert forward_flops(scanned, shapes, x) == forward_flops(unrolled, None, x)
    un_shapes = jax.eval_shape(unrolled.init, jax.random.key(0), jnp.zeros(x),
                               jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
    assert n_params(shapes) == n_params(un_shapes)


def test_scan_blocks_setting_from_config():
    from configs.base import get_base_config
    from diffusion.models import build_model
    assert scan_blocks_for("auto", 12) and scan_blocks_for("auto", 28)
    assert not scan_blocks_for("auto", 2)
    assert scan_blocks_for("on", 1) and not scan_blocks_for("off", 28)
    assert scan_blocks_for(True, 1) and not scan_blocks_for(False, 28)
    with pytest.raises(ValueError, match="auto, on or off"):
        scan_blocks_for("maybe", 4)
    m = get_base_config().model
    m.name = "dit"
    assert m.dit.scan_blocks == "auto"
    assert build_model(m, (32, 32, 4), 0).scan_blocks  # S/2: depth 12
    m.dit.depth = 2
    assert not build_model(m, (32, 32, 4), 0).scan_blocks
    m.dit.scan_blocks = "on"
    assert build_model(m, (32, 32, 4), 0).scan_blocks
    del m.dit["scan_blocks"]  # a run's config.json from before the switch: unrolled
    assert not build_model(m, (32, 32, 4), 0).scan_blocks
