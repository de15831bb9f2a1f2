"""A small CNN classifier whose penultimate layer serves as an offline feature network.

No FID-grade network ships with any package, so for 28x28 grey datasets (Fashion-MNIST)
the project trains its own: two conv stages, a 128-d ReLU feature layer and a linear
classifier. FID computed on these features ("fid_classifier") is comparable only with
itself, not with published Inception FIDs.

Input: images [B, 28, 28, 1] in [-1, 1]. Output: dict(pool=[B, 128], logits=[B, 10]).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp

# Shipped as package data (pyproject.toml), found next to this file in any install.
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                               "fmnist_classifier.msgpack")
IMAGE_SHAPE = (28, 28, 1)


def fit_to_classifier(images: Any) -> Any:
    """Images [B, H, W, C] -> [B, 28, 28, 1]: other sizes resized (bilinear) and colour
    averaged, so any dataset can be scored in the classifier's features."""
    if tuple(images.shape[1:]) == IMAGE_SHAPE:
        return images
    x = jnp.asarray(images, jnp.float32).mean(axis=-1, keepdims=True)
    return jax.image.resize(x, (x.shape[0],) + IMAGE_SHAPE, "linear")


class SmallClassifier(nn.Module):
    """conv(c1) -> pool -> conv(c2) -> pool -> dense(feature_dim) -> dense(num_classes)."""
    num_classes: int = 10
    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 128
    image_size: int = 28
    image_channels: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        expected = (self.image_size, self.image_size, self.image_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"classifier expects images [B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got shape {tuple(images.shape)}")
        x = images.astype(self.dtype)
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
                        name=f"conv{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        pool = nn.relu(nn.Dense(self.feature_dim, dtype=self.dtype, param_dtype=jnp.float32,
                                name="features")(x))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                          name="logits")(pool)
        return dict(pool=pool.astype(jnp.float32), logits=logits)


def save_classifier(path: str, params: Any) -> None:
    """Writes classifier params as flax msgpack."""
    with open(path, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))


def load_classifier(path: str, model: SmallClassifier | None = None) -> Any:
    """Reads params saved by save_classifier, checked against the model's structure."""
    model = model or SmallClassifier()
    target = jax.eval_shape(
        model.init, jax.random.key(0),
        jnp.zeros((1, model.image_size, model.image_size, model.image_channels)))["params"]
    with open(path, "rb") as f:
        raw = flax.serialization.msgpack_restore(f.read())
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), raw)
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), target)
    if got != want:
        raise ValueError(f"{path} does not hold SmallClassifier params of this configuration: "
                         f"shapes {got} != {want}")
    return jax.tree_util.tree_map(jnp.asarray, raw)
