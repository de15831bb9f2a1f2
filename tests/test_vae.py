"""Tests of the KL autoencoder, its training losses and the PSNR/SSIM metrics.
Models are tiny (widths 8/16, one ResNet block per level, 8x8 images)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from diffusion.autoencoder.losses import (NLayerDiscriminator, adaptive_weight, hinge_d_loss,
                                          kl_divergence, last_layer_grad, reconstruction_loss,
                                          vae_discriminator_loss, vae_generator_loss)
from diffusion.autoencoder.metrics import psnr, ssim
from diffusion.models.vae import AutoencoderKL, estimate_scale_factor

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def numpy_init(module, x, seed=0):
    """Random variables of the module's shapes, drawn with numpy.

    A jitted `module.init` spends ~30 s on 2 CPU cores compiling the threefry draws
    of each parameter; this costs nothing and makes norms and biases non-trivial.
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            scale = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0, scale, leaf.shape), jnp.float32)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    vae = AutoencoderKL(**TINY)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    return vae, numpy_init(vae, x, seed=1), x


def test_sd_vae_parameter_count():
    # Stable Diffusion's VAE (diffusers AutoencoderKL, sd-vae-ft-*): 83,653,863 params.
    shapes = jax.eval_shape(AutoencoderKL().init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert sum(p.size for p in jax.tree.leaves(shapes)) == 83_653_863
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))


@pytest.mark.parametrize("chans,f", [((8,), 1), ((8, 8, 16), 4)])
def test_shapes_follow_downsampling_factor(chans, f):
    vae = AutoencoderKL(block_out_channels=chans, layers_per_block=1, norm_num_groups=4,
                        latent_channels=3, in_channels=1, out_channels=2)
    assert vae.downsample_factor == f
    x = jnp.zeros((2, 16, 8, 1))
    shapes = jax.eval_shape(lambda: vae.init_with_output(jax.random.key(0), x))[0]
    x_hat, mean, logvar = shapes
    assert x_hat.shape == (2, 16, 8, 2)
    assert mean.shape == logvar.shape == (2, 16 // f, 8 // f, 3)


def test_encode_decode_and_sampling(tiny):
    vae, variables, x = tiny

    @jax.jit  # one compile for all the calls under test
    def run(v, x):
        mean, logvar = vae.apply(v, x, method="encode")
        sample = lambda k: vae.apply(v, x, sample_posterior=True, rngs={"sample": k})
        return (mean, logvar, vae.apply(v, x), vae.apply(v, mean, method="decode"),
                sample(jax.random.key(2)), sample(jax.random.key(3)))

    mean, logvar, (x_hat, mean2, _), dec_mean, s1, s2 = run(variables, x)
    assert mean.shape == logvar.shape == (2, 4, 4, 4) and x_hat.shape == x.shape
    np.testing.assert_allclose(mean2, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x_hat, dec_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1[1], mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(s1[0], s2[0]) and not np.allclose(s1[0], x_hat)
    with pytest.raises(Exception, match="sample"):
        vae.apply(variables, x, sample_posterior=True)


def test_logvar_is_clipped(tiny):
    vae, variables, x = tiny
    encode = jax.jit(lambda v, x: vae.apply(v, x, method="encode"))
    for shift, bound in ((1e3, 20.0), (-1e3, -30.0)):
        params = jax.tree.map(lambda a: a, variables["params"])
        params["quant_conv"]["bias"] = params["quant_conv"]["bias"].at[4:].add(shift)
        _, logvar = encode({"params": params}, x)
        np.testing.assert_array_equal(logvar, bound)


def test_bad_inputs_give_clear_errors(tiny):
    vae, variables, _ = tiny
    with pytest.raises(ValueError, match="factor 2 does not divide image size 7x8"):
        vae.apply(variables, jnp.zeros((1, 7, 8, 3)), method="encode")
    with pytest.raises(ValueError, match="in_channels=3"):
        vae.apply(variables, jnp.zeros((1, 8, 8, 1)), method="encode")
    with pytest.raises(ValueError, match="latents"):
        vae.apply(variables, jnp.zeros((1, 4, 4, 3)), method="decode")
    with pytest.raises(ValueError, match="norm_num_groups 32 does not divide block width 8"):
        AutoencoderKL(block_out_channels=(8,)).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_bf16_activations_keep_float32_params(tiny):
    _, variables, x = tiny
    vae16 = AutoencoderKL(**TINY, dtype=jnp.bfloat16)
    (x_hat, mean, _), (x_ref, _, _) = jax.jit(
        lambda v, x: (vae16.apply(v, x), AutoencoderKL(**TINY).apply(v, x)))(variables, x)
    assert x_hat.dtype == jnp.bfloat16 and mean.dtype == jnp.float32
    assert float(jnp.abs(x_hat.astype(jnp.float32) - x_ref).max()) < 0.1


def test_estimate_scale_factor():
    rng = np.random.default_rng(0)
    batches = [rng.normal(0.3, 2.0, (64, 4, 4, 4)) for _ in range(4)]
    assert estimate_scale_factor(lambda b: b, batches) == pytest.approx(0.5, rel=0.03)
    # (mean, logvar) outputs with a seed: posterior samples, total std sqrt(4 + 1).
    enc = lambda b: (b, jnp.zeros_like(b))
    dict_batches = [{"image": b} for b in batches]
    est = estimate_scale_factor(enc, dict_batches, seed=1)
    assert est == pytest.approx(1 / math.sqrt(5.0), rel=0.03)
    assert estimate_scale_factor(enc, dict_batches) == pytest.approx(0.5, rel=0.03)
    with pytest.raises(ValueError, match="no latents"):
        estimate_scale_factor(lambda b: b, [])


# ---- losses -----------------------------------------------------------------------

def test_kl_reconstruction_and_hinge_closed_forms():
    mean = jnp.array([[0.5, -1.0]])
    logvar = jnp.array([[0.0, math.log(2.0)]])
    expected = 0.5 * (0.25 + 0 + (1.0 + 2.0 - 1.0 - math.log(2.0)))
    np.testing.assert_allclose(kl_divergence(mean, logvar), [expected], rtol=1e-6)
    np.testing.assert_allclose(kl_divergence(jnp.zeros((3, 2, 2, 4)), jnp.zeros((3, 2, 2, 4))), 0.0)
    x, y = jnp.zeros((2, 2, 2, 1)), jnp.full((2, 2, 2, 1), 0.5)
    np.testing.assert_allclose(reconstruction_loss(x, y, "l1"), [2.0, 2.0])
    np.testing.assert_allclose(reconstruction_loss(x, y, "l2"), [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'"):
        reconstruction_loss(x, y, "l3")
    # hinge: real logits 2 (no loss) and 0 (loss 1); fake logits -2 (none), 1 (loss 2).
    np.testing.assert_allclose(hinge_d_loss(jnp.array([2.0, 0.0]), jnp.array([-2.0, 1.0])),
                               0.5 * (0.5 + 1.0))


def test_discriminator_patch_shape():
    disc = NLayerDiscriminator()
    shapes = jax.eval_shape(lambda: disc.init_with_output(jax.random.key(0),
                                                          jnp.zeros((1, 256, 256, 3))))
    assert shapes[0].shape == (1, 30, 30, 1)  # pix2pix's 70x70 PatchGAN map at 256


@pytest.fixture(scope="module")
def flat():
    """One level, no attention: the loss tests compile gradients of the whole VAE."""
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                        mid_attention=False)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    return vae, numpy_init(vae, x, seed=2), x


def test_last_layer_grad_matches_full_autodiff(flat):
    vae, variables, x = flat
    target = jnp.roll(x, 1, axis=0)
    loss_fn = lambda xh: jnp.sum(jnp.abs(xh - target)) + jnp.sum(xh ** 3)

    @jax.jit
    def both(v):
        x_hat, _, _, feats = vae.apply(v, x, return_features=True)
        kernel = v["params"]["decoder"]["conv_out"]["kernel"]
        full = jax.grad(lambda v: loss_fn(vae.apply(v, x)[0]))(v)
        return last_layer_grad(loss_fn, x_hat, feats, kernel), full

    got, full = both(variables)
    np.testing.assert_allclose(got, full["params"]["decoder"]["conv_out"]["kernel"],
                               rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(got).max()) > 0
    # ratio of norms, scaled by disc_weight and clipped at 1e4
    np.testing.assert_allclose(adaptive_weight(3 * got, got, 0.5), 1.5, rtol=1e-3)
    np.testing.assert_allclose(adaptive_weight(got, 0 * got, 1.0), 1e4)


def test_generator_and_discriminator_losses(flat):
    vae, variables, x = flat
    disc = NLayerDiscriminator(base_channels=8, n_layers=1)
    disc_params = numpy_init(disc, x, seed=5)
    key = jax.random.key(6)
    kw = dict(disc_start=10)
    # One compiled generator step (loss and grads), step traced: before/after share it.
    gen = jax.jit(jax.value_and_grad(
        lambda v, step: vae_generator_loss(vae, v, disc, disc_params, x, key, step, **kw),
        has_aux=True))
    (before, m_before), _ = gen(variables, 9)
    (after, m_after), grads = gen(variables, 10)
    # Before disc_start only rec + kl_weight * KL is left (LDM's default kl_weight 1e-6).
    plain = m_before["rec_loss"] + 1e-6 * m_before["kl"]
    np.testing.assert_allclose(before, plain, rtol=1e-6)
    np.testing.assert_allclose(m_after["rec_loss"], m_before["rec_loss"], rtol=1e-6)
    assert float(m_before["kl"]) > 0
    assert m_before["disc_factor"] == 0 and m_after["disc_factor"] == 1
    np.testing.assert_allclose(after, plain + m_after["d_weight"] * m_after["g_loss"],
                               rtol=1e-5)
    assert float(m_after["d_weight"]) > 0
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    disc_step = jax.jit(jax.value_and_grad(
        lambda p, step: vae_discriminator_loss(disc, p, x, x * 0.5, step, **kw)[0]))
    d_before, _ = disc_step(disc_params, 9)
    d_after, d_grads = disc_step(disc_params, 10)
    assert float(d_before) == 0.0 and float(d_after) > 0.0
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(d_grads))


# ---- metrics ----------------------------------------------------------------------

def _ssim_reference(x, y, data_range):
    """numpy/scipy SSIM: Gaussian filter (sigma 1.5, radius 5), border cropped."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for b in range(x.shape[0]):
        maps = []
        for c in range(x.shape[-1]):
            f = lambda a: scipy.ndimage.gaussian_filter(a, 1.5, truncate=3.5)[5:-5, 5:-5]
            a, bb = x[b, ..., c].astype(np.float64), y[b, ..., c].astype(np.float64)
            ma, mb = f(a), f(bb)
            va, vb, cov = f(a * a) - ma ** 2, f(bb * bb) - mb ** 2, f(a * bb) - ma * mb
            maps.append(((2 * ma * mb + c1) * (2 * cov + c2))
                        / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        vals.append(np.mean(maps))
    return np.array(vals)


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 20, 24, 3)).astype(np.float32)
    x = scipy.ndimage.uniform_filter(x, size=(1, 3, 3, 1))  # some spatial structure
    y = (x + rng.normal(0, 0.2, x.shape)).astype(np.float32)
    np.testing.assert_allclose(psnr(x, x + 0.1), 10 * math.log10(4 / 0.01), rtol=1e-4)
    np.testing.assert_allclose(ssim(x, x), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ssim(x, y), _ssim_reference(x, y, 2.0), rtol=1e-4)
    assert float(ssim(x, y).max()) < 0.9
    with pytest.raises(ValueError, match="window 11 is larger than image size 8x8"):
        ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))
