"""Cross-attention to context tokens in the project's own U-Net and DiT (context_dim):
off by default (no new parameters, no context input), zero-initialised when on (a
fresh network computes what it computed without it), then the tokens steer the output,
and the scanned DiT equals the unrolled one with context too."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models.dit import DiT, stack_blocks
from diffusion.models.unet import UNet

from param_noise import perturbed


B, L, D = 2, 5, 12
UNET = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2)
DIT = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([10.0, 500.0])
    ctx = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    return x, t, ctx


def _perturb(params):
    """Every parameter moved at random: zero-initialised projections become live."""
    return perturbed(params, 0.1, seed=1)


def _xattn_paths(params):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
            if "xattn" in jax.tree_util.keystr(p)]


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_context_off_by_default_and_on_is_zero_initialised(kind):
    x, t, ctx = _inputs()
    plain = UNet(**UNET) if kind == "unet" else DiT(**DIT)
    text = plain.clone(context_dim=D)
    p_plain = jax.jit(plain.init)(jax.random.key(0), x, t)["params"]
    p_text = jax.jit(text.init)(jax.random.key(0), x, t, context=ctx)["params"]
    apply_text = jax.jit(text.apply)
    assert not _xattn_paths(p_plain)
    if kind == "unet":  # one after each self-attention (4x4 down, mid, 4x4 up)
        attn = {k for k in p_plain if "attn" in k}
        assert len(attn) == 4
        assert set(p_text) - set(p_plain) == {f"{k}_xattn" for k in attn}
    else:  # in every block
        assert all("xattn" in p_text[f"block_{i}"] for i in range(DIT["depth"]))

    # Same (trained-looking) weights elsewhere and fresh cross-attention: the text
    # model computes the plain model's function, whatever the tokens.
    trained = _perturb(p_plain)
    out_plain = jax.jit(plain.apply)({"params": trained}, x, t)
    assert float(jnp.abs(out_plain).max()) > 1e-2
    out_text = apply_text({"params": _copy_shared(trained, p_text)}, x, t, context=ctx)
    np.testing.assert_allclose(out_text, out_plain, atol=1e-5)

    # Once the new projections are non-zero, the tokens change the output.
    live = _perturb(p_text)
    a = apply_text({"params": live}, x, t, context=ctx)
    b = apply_text({"params": live}, x, t, context=ctx[::-1])
    assert float(jnp.abs(a[0] - b[0]).max()) > 1e-3


def _copy_shared(src, dst):
    """dst with every leaf that src also has replaced by src's."""
    if not isinstance(dst, dict):
        return src
    return {k: _copy_shared(src[k], v) if k in src else v for k, v in dst.items()}


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_context_gradient_reaches_zero_initialised_projection(kind):
    x, t, ctx = _inputs()
    model = UNet(**UNET, context_dim=D) if kind == "unet" else DiT(**DIT, context_dim=D)
    params = jax.jit(model.init)(jax.random.key(0), x, t, context=ctx)["params"]
    # A network some way into training (a fresh one's zero output layer, conv_out or
    # adaLN-Zero, passes no gradient upstream) with fresh cross-attention output layers.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: np.zeros_like(v) if "to_out_0" in jax.tree_util.keystr(p) else v,
        _perturb(params))
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t,
                                                           context=ctx) ** 2)))(params)
    outs = [float(jnp.abs(g).max()) for path, g in
            jax.tree_util.tree_flatten_with_path(grads)[0]
            if "to_out_0" in jax.tree_util.keystr(path) and "kernel" in
            jax.tree_util.keystr(path)]
    assert outs and min(outs) > 0


def test_scanned_dit_with_context_equals_unrolled():
    x, t, ctx = _inputs()
    model = DiT(**DIT, context_dim=D)
    params = _perturb(jax.jit(model.init)(jax.random.key(0), x, t, context=ctx)["params"])
    out = jax.jit(model.apply)({"params": params}, x, t, context=ctx)
    scanned = jax.jit(model.clone(scan_blocks=True).apply)(
        {"params": stack_blocks(params)}, x, t, context=ctx)
    np.testing.assert_allclose(scanned, out, atol=1e-5)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_context_errors(kind):
    x, t, ctx = _inputs()
    build = (lambda **kw: UNet(**UNET, **kw)) if kind == "unet" else \
        (lambda **kw: DiT(**DIT, **kw))
    init = lambda m, **kw: jax.eval_shape(m.init, jax.random.key(0), x, t, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="without cross-attention"):
        init(build(), context=ctx)
    with pytest.raises(ValueError, match="needs context tokens of shape"):
        init(build(context_dim=D))
    with pytest.raises(ValueError, match=r"context of shape \[B=2, L, context_dim=8\]"):
        init(build(context_dim=8), context=ctx)
