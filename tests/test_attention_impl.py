"""model.attention_impl: the attention backend of the denoisers, checked before anything
is built or compiled; 'xla' is JAX's default, so both give the same outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config, make_tiny
from diffusion.models import attention_implementation, build_model
from diffusion.train import validate


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_xla_equals_default(name):
    c = make_tiny(get_base_config())
    c.model.name = name
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    t = jnp.array([0.1, 0.7])
    outs = []
    for impl in ("", "xla"):
        c.model.attention_impl = impl
        model = build_model(c.model, (8, 8, 3), num_classes=0)
        if not outs:  # jitted: eagerly, every op compiled a program of its own
            params = jax.jit(functools.partial(model.init, train=False))(
                jax.random.key(1), x, t, None)
        outs.append(jax.jit(functools.partial(model.apply, train=False))(params, x, t, None))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_unknown_value_is_named_before_anything_is_built():
    c = make_tiny(get_base_config())
    c.model.attention_impl = "flash"
    with pytest.raises(validate.ConfigError, match="model.attention_impl 'flash'"):
        validate.check_config(c, 1)
    with pytest.raises(ValueError, match="'flash'"):
        build_model(c.model, (8, 8, 3), num_classes=0)


def test_cudnn_needs_a_gpu_and_half_precision():
    c = make_tiny(get_base_config())
    c.model.attention_impl = "cudnn"
    c.model.dtype = "bfloat16"
    if jax.default_backend() != "gpu":
        with pytest.raises(validate.ConfigError, match="needs an NVIDIA GPU.*'cpu'"):
            validate.check_config(c, 1)
    assert attention_implementation("cudnn", "bfloat16", backend="gpu") == "cudnn"
    with pytest.raises(ValueError, match="half-precision"):
        attention_implementation("cudnn", "float32", backend="gpu")
    assert attention_implementation("", "float32") is None
    assert attention_implementation("xla", "float32") == "xla"
