"""Losses for training the KL autoencoder, after LDM's `LPIPSWithDiscriminator`
(without the LPIPS term, whose weights no package ships):

  L_G = rec + kl_weight * KL(q(z|x) || N(0, I)) + disc_factor * lambda * (-mean D(x_hat))
  L_D = disc_factor * hinge(D(x), D(x_hat))

rec and KL are summed over each image and averaged over the batch, as in LDM (the
default kl_weight=1e-6 assumes that scale). lambda is LDM's adaptive weight: the ratio
of the gradient norms of rec and of the generator loss w.r.t. the decoder's last
layer, times `disc_weight`. disc_factor switches the adversarial terms on at
`disc_start`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.vae import AutoencoderKL

Dtype = Any


def reconstruction_loss(x: jnp.ndarray, x_hat: jnp.ndarray, kind: str = "l1") -> jnp.ndarray:
    """Per-image sum of |x - x_hat| (l1) or (x - x_hat)^2 (l2): [B, H, W, C] -> [B]."""
    d = x_hat.astype(jnp.float32) - x.astype(jnp.float32)
    if kind == "l1":
        d = jnp.abs(d)
    elif kind == "l2":
        d = jnp.square(d)
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}: expected 'l1' or 'l2'")
    return d.reshape(d.shape[0], -1).sum(axis=1)


def kl_divergence(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each latent: -> [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def hinge_d_loss(logits_real: jnp.ndarray, logits_fake: jnp.ndarray) -> jnp.ndarray:
    return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake: jnp.ndarray) -> jnp.ndarray:
    return -jnp.mean(logits_fake)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / LDM): image [B, H, W, C] -> logits [B, h, w, 1].

    4x4 convs: one stride-2 conv, n_layers-1 more stride-2 convs and one stride-1 conv
    with norm, LeakyReLU(0.2) after each, then a stride-1 conv to one logit per patch.
    norm: 'group' (GroupNorm, 32 groups at most) or 'none'. LDM used BatchNorm; a
    stateless norm keeps the adversarial train step a pure function of params.
    """
    base_channels: int = 64
    n_layers: int = 3
    norm: str = "group"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.norm not in ("group", "none"):
            raise ValueError(f"unknown discriminator norm {self.norm!r}: 'group' or 'none'")
        init = nn.initializers.normal(0.02)  # pix2pix's initialisation
        conv = lambda ch, stride, bias, name: nn.Conv(
            ch, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
            use_bias=bias, kernel_init=init, dtype=self.dtype, name=name)
        h = nn.leaky_relu(conv(self.base_channels, 2, True, "conv_0")(x), 0.2)
        for n in range(1, self.n_layers + 1):
            ch = self.base_channels * min(2 ** n, 8)
            stride = 2 if n < self.n_layers else 1
            h = conv(ch, stride, self.norm == "none", f"conv_{n}")(h)
            if self.norm == "group":
                h = nn.GroupNorm(num_groups=min(32, ch), dtype=self.dtype,
                                 name=f"norm_{n}")(h)
            h = nn.leaky_relu(h, 0.2)
        return conv(1, 1, True, "conv_out")(h).astype(jnp.float32)


def last_layer_grad(loss_fn: Callable[[jnp.ndarray], jnp.ndarray], x_hat: jnp.ndarray,
                    features: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """d loss_fn(x_hat) / d kernel of the decoder's last 3x3 conv (x_hat = conv(features)).

    Chains the gradient w.r.t. the output through that one conv, so nothing upstream
    of the last layer is differentiated (what torch.autograd.grad on the last layer
    costs in LDM).
    """
    g_out = jax.grad(loss_fn)(x_hat).astype(jnp.float32)
    conv = lambda k: jax.lax.conv_general_dilated(
        features.astype(jnp.float32), k, (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, vjp = jax.vjp(conv, kernel.astype(jnp.float32))
    return vjp(g_out)[0]


def adaptive_weight(rec_grad: jnp.ndarray, gen_grad: jnp.ndarray,
                    disc_weight: float = 0.5) -> jnp.ndarray:
    """disc_weight * clip(|grad rec| / (|grad gen| + 1e-4), 0, 1e4), no gradient."""
    w = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gen_grad) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


def disc_factor(step: jnp.ndarray, disc_start: int) -> jnp.ndarray:
    """1.0 once step >= disc_start, else 0.0 (jit-friendly)."""
    return jnp.where(jnp.asarray(step) >= disc_start, 1.0, 0.0)


def vae_generator_loss_and_recon(vae: AutoencoderKL, vae_params: dict,
                                 disc: NLayerDiscriminator | None, disc_params: dict | None,
                                 x: jnp.ndarray, key: jax.Array, step: jnp.ndarray, *,
                                 rec_kind: str = "l1", kl_weight: float = 1e-6,
                                 disc_weight: float = 0.5, disc_start: int = 50_001):
    """Autoencoder loss L_G -> (loss, (metrics, x_hat)). Differentiate w.r.t.
    `vae_params` (the variables dict, {'params': ...}); disc=None trains without the GAN
    term. x_hat is returned so a train step can reuse it for the discriminator."""
    x_hat, mean, logvar, feats = vae.apply(vae_params, x, sample_posterior=True,
                                           return_features=True, rngs={"sample": key})
    rec_fn = lambda xh: jnp.mean(reconstruction_loss(x, xh, rec_kind))
    rec = rec_fn(x_hat)
    kl = jnp.mean(kl_divergence(mean, logvar))
    loss = rec + kl_weight * kl
    metrics = {"rec_loss": rec, "kl": kl}
    if disc is not None:
        gen_fn = lambda xh: generator_adv_loss(disc.apply(disc_params, xh))
        g_loss = gen_fn(x_hat)
        kernel = vae_params["params"]["decoder"]["conv_out"]["kernel"]
        d_weight = adaptive_weight(last_layer_grad(rec_fn, x_hat, feats, kernel),
                                   last_layer_grad(gen_fn, x_hat, feats, kernel),
                                   disc_weight)
        factor = disc_factor(step, disc_start)
        loss = loss + factor * d_weight * g_loss
        metrics.update(g_loss=g_loss, d_weight=d_weight, disc_factor=factor)
    metrics["loss"] = loss
    return loss, (metrics, x_hat)


def vae_generator_loss(*args, **kwargs):
    """Autoencoder loss L_G -> (loss, metrics); see vae_generator_loss_and_recon."""
    loss, (metrics, _) = vae_generator_loss_and_recon(*args, **kwargs)
    return loss, metrics


def vae_discriminator_loss(disc: NLayerDiscriminator, disc_params: dict, x: jnp.ndarray,
                           x_hat: jnp.ndarray, step: jnp.ndarray, *,
                           disc_start: int = 50_001):
    """Discriminator loss L_D -> (loss, metrics); x_hat is treated as a constant."""
    logits_real = disc.apply(disc_params, x)
    logits_fake = disc.apply(disc_params, jax.lax.stop_gradient(x_hat))
    loss = disc_factor(step, disc_start) * hinge_d_loss(logits_real, logits_fake)
    return loss, {"d_loss": loss, "logits_real": jnp.mean(logits_real),
                  "logits_fake": jnp.mean(logits_fake)}
