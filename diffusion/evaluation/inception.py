"""Inception-v3 in Flax linen, the FID variant (pytorch-fid's port of TF's 2015 graph).

The layout follows torchvision's Inception3 with pytorch-fid's patched blocks:
FIDInceptionA/C/E_1 average-pool without counting padding, FIDInceptionE_2 (Mixed_7c)
max-pools in its pool branch, and the classifier has 1008 outputs. Submodule names equal
the PyTorch attribute names (Conv2d_1a_3x3, Mixed_5b.branch1x1, ...) so that a
pytorch-fid state dict maps onto the params one key at a time (see inception_weights.py).

Input: images [B, H, W, C] in [-1, 1] with C in {1, 3}; resized bilinearly (half-pixel
centres, no antialiasing, as torch's F.interpolate(align_corners=False)) to
`resize_to` x `resize_to`. Output: dict(pool=[B, 2048], logits=[B, 1008]).
The smallest spatial size the network accepts is 75.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

MIN_INPUT_SIZE = 75
NUM_FID_CLASSES = 1008
POOL_DIM = 2048


def _pad(p: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    ph, pw = (p, p) if isinstance(p, int) else p
    return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""
    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: int | tuple[int, int] = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=_pad(self.padding), use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, name="conv")(x)
        # Inference only: the network is a fixed feature extractor.
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype,
                         param_dtype=jnp.float32, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's average pool divides by the number of valid (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pool branches."""
    pool_features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = conv(64, (1, 1), 0, "branch1x1")(x)
        b5 = conv(48, (1, 1), 0, "branch5x5_1")(x)
        b5 = conv(64, (5, 5), 2, "branch5x5_2")(b5)
        b3 = conv(64, (1, 1), 0, "branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), 1, "branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), 1, "branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), 0, "branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=2, dtype=self.dtype, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), dtype=self.dtype, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=1, dtype=self.dtype, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, dtype=self.dtype, name="branch3x3dbl_3")(bd)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches."""
    channels_7x7: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = conv(192, (1, 1), 0, "branch1x1")(x)
        b7 = conv(c7, (1, 1), 0, "branch7x7_1")(x)
        b7 = conv(c7, (1, 7), (0, 3), "branch7x7_2")(b7)
        b7 = conv(192, (7, 1), (3, 0), "branch7x7_3")(b7)
        bd = conv(c7, (1, 1), 0, "branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), (0, 3), "branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), (3, 0), "branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), (0, 3), "branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), 0, "branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, p, name: BasicConv2d(f, k, strides=s, padding=p,
                                                    dtype=self.dtype, name=name)
        b3 = conv(192, (1, 1), 1, 0, "branch3x3_1")(x)
        b3 = conv(320, (3, 3), 2, 0, "branch3x3_2")(b3)
        b7 = conv(192, (1, 1), 1, 0, "branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), 1, (0, 3), "branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), 1, (3, 0), "branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), 2, 0, "branch7x7x3_4")(b7)
        bp = nn.max_pool(x, (3, 3), strides=(2, 2))
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: expanded filter banks; `max_pool` selects the FIDInceptionE_2 quirk."""
    max_pool: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, dtype=self.dtype, name=name)
        b1 = conv(320, (1, 1), 0, "branch1x1")(x)
        b3 = conv(384, (1, 1), 0, "branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3),
                              conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), 0, "branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), 1, "branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)], axis=-1)
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_same(x)
        bp = conv(192, (1, 1), 0, "branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of [B, H, W, C] to [B, size, size, C], matching torch's
    F.interpolate(mode='bilinear', align_corners=False) (no antialiasing)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)


class InceptionV3FID(nn.Module):
    """FID Inception-v3. Call: (images [B, H, W, C] in [-1, 1]) -> dict(pool, logits)."""
    resize_to: int = 299
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected images [B, H, W, 1 or 3], got shape {images.shape}")
        if self.resize_to < MIN_INPUT_SIZE:
            raise ValueError(f"resize_to={self.resize_to} is below Inception-v3's minimum "
                             f"input size {MIN_INPUT_SIZE}")
        x = images.astype(jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)  # grey images: the same value on every channel
        # pytorch-fid resizes images in [0, 1] then maps to [-1, 1]; the map is affine so
        # resizing our [-1, 1] images directly gives the same input.
        x = resize_bilinear(x, self.resize_to).astype(self.dtype)
        d = self.dtype
        x = BasicConv2d(32, (3, 3), strides=2, dtype=d, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), dtype=d, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=1, dtype=d, name="Conv2d_2b_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = BasicConv2d(80, (1, 1), dtype=d, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), dtype=d, name="Conv2d_4a_3x3")(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2))
        x = InceptionA(32, dtype=d, name="Mixed_5b")(x)
        x = InceptionA(64, dtype=d, name="Mixed_5c")(x)
        x = InceptionA(64, dtype=d, name="Mixed_5d")(x)
        x = InceptionB(dtype=d, name="Mixed_6a")(x)
        x = InceptionC(128, dtype=d, name="Mixed_6b")(x)
        x = InceptionC(160, dtype=d, name="Mixed_6c")(x)
        x = InceptionC(160, dtype=d, name="Mixed_6d")(x)
        x = InceptionC(192, dtype=d, name="Mixed_6e")(x)
        x = InceptionD(dtype=d, name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, dtype=d, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, dtype=d, name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]
        logits = nn.Dense(NUM_FID_CLASSES, dtype=jnp.float32, param_dtype=jnp.float32,
                          name="fc")(pool)
        return dict(pool=pool, logits=logits)
