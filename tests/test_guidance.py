"""Class conditioning and classifier-free guidance, for the DiT and the U-Net.

Networks are tiny and class-conditional, with every parameter (the zero-initialised
adaLN / output layers too) drawn at random so that outputs depend on x, t and y. Checked:
labels change the output; a negative label, the null row K and y=None are the same
class; guidance w = 1 is the conditional prediction, w = 0 the unconditional one, and
any w the CFG combination; a new w runs the compiled sampler again without retracing;
label dropout; and a class-conditional DiT train step on 8 devices equals 1 device.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.dit_fashion_mnist_cond import get_config
from diffusion import parallel
from diffusion.denoiser import from_flax
from diffusion.models import DiT, UNet
from diffusion.schedules import make_schedule
from diffusion.train import sampling
from diffusion.train.setup import build_run
from diffusion.train.step import drop_labels

from train_steps import train_steps

K = 4          # classes; label row K is the null class
B, H, C = 4, 8, 3
SCHEDULE = make_schedule("linear", 100)


def _model(name: str):
    if name == "dit":
        return DiT(input_size=H, patch_size=2, in_channels=C, hidden_size=32, depth=1,
                   num_heads=2, num_classes=K)
    return UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=1,
                num_classes=K)


_VARIABLES = {}


def _random_leaf(rng: np.random.Generator, path, shape) -> np.ndarray:
    """Kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.05^2), the rest ~ N(0, 0.05^2)."""
    name = str(path[-1].key)
    z = rng.standard_normal(shape).astype(np.float32)
    if name == "kernel":
        return z / np.sqrt(np.prod(shape[:-1]))
    return 1.0 + 0.05 * z if name == "scale" else 0.05 * z


def _variables(name: str):
    """Random values in every parameter, the zero-initialised adaLN / output layers too.
    Drawn on the host from the init shapes: compiling an init costs more than the tests."""
    if name not in _VARIABLES:
        shapes = jax.eval_shape(_model(name).init, jax.random.key(0),
                                jnp.zeros((1, H, H, C)), jnp.zeros((1,)),
                                jnp.zeros((1,), jnp.int32))
        rng = np.random.default_rng(0)
        _VARIABLES[name] = jax.tree_util.tree_map_with_path(
            lambda path, a: jnp.asarray(_random_leaf(rng, path, a.shape)), shapes)
    return _VARIABLES[name]


# Label sets probed in one batched network call: each row of a set is one example.
LABELS = {"0": [0] * B, "1": [1] * B, "null": [K] * B, "-1": [-1] * B, "-7": [-7] * B,
          "mixed": [0, -1, 1, K]}


def _probe(name: str):
    """One compiled fn(w) -> outputs for every label set, for y=None, the conditional and
    unconditional predictions, and the prediction guided with weight w (traced)."""
    model, variables = _model(name), _variables(name)
    denoiser = from_flax(model, variables, SCHEDULE, pred_type="eps")
    kx, kt = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (B, H, H, C))
    t = jax.random.uniform(kt, (B,), minval=0.05, maxval=0.95)  # continuous time
    c_noise = SCHEDULE.c_noise(t)
    y = jnp.array([0, 1, 2, 3], jnp.int32)
    n = len(LABELS)

    @jax.jit
    def probe(w):
        out = model.apply(variables, jnp.tile(x, (n, 1, 1, 1)), jnp.tile(c_noise, n),
                          jnp.array(sum(LABELS.values(), []), jnp.int32))
        res = dict(zip(LABELS, jnp.split(out, n)))
        res["none"] = model.apply(variables, x, c_noise, None)
        both = denoiser.predict(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                jnp.concatenate([y, jnp.full_like(y, -1)]))
        res["cond_eps"], res["uncond_eps"] = jnp.split(both.eps, 2)
        res["cond_x0"] = both.x0[:B]
        guided = denoiser.predict(x, t, y, w)
        res["guided_eps"], res["guided_x0"] = guided.eps, guided.x0
        return res
    return probe


_PROBES = {}


def _probed(name: str, w: float) -> dict:
    if name not in _PROBES:
        _PROBES[name] = _probe(name)
    return {k: np.asarray(v) for k, v in _PROBES[name](jnp.float32(w)).items()}


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_labels_condition_and_negative_labels_are_null(name):
    out = _probed(name, 1.0)
    scale = np.abs(out["null"]).mean()
    assert scale > 1e-3, "perturbed network should give a non-trivial output"
    assert np.abs(out["0"] - out["null"]).mean() > 1e-3 * scale   # label vs null
    assert np.abs(out["0"] - out["1"]).mean() > 1e-3 * scale      # label vs label
    np.testing.assert_allclose(out["-1"], out["null"], atol=1e-5)
    np.testing.assert_allclose(out["-7"], out["null"], atol=1e-5)
    np.testing.assert_allclose(out["none"], out["null"], atol=1e-5)
    mixed = out["mixed"]  # per-example labels [0, -1, 1, K]
    np.testing.assert_allclose(mixed[0], out["0"][0], atol=1e-5)
    np.testing.assert_allclose(mixed[1], out["null"][1], atol=1e-5)
    np.testing.assert_allclose(mixed[2], out["1"][2], atol=1e-5)


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_guidance_combines_conditional_and_unconditional(name):
    one, zero, w = _probed(name, 1.0), _probed(name, 0.0), 3.5
    cond, uncond = one["cond_eps"], one["uncond_eps"]
    assert np.abs(cond - uncond).mean() > 1e-4
    np.testing.assert_allclose(one["guided_eps"], cond, atol=1e-5)      # w = 1: conditional
    np.testing.assert_allclose(one["guided_x0"], one["cond_x0"], atol=1e-4)
    np.testing.assert_allclose(zero["guided_eps"], uncond, atol=1e-5)   # w = 0: unconditional
    np.testing.assert_allclose(_probed(name, w)["guided_eps"], uncond + w * (cond - uncond),
                               atol=1e-4)
    if hasattr(_PROBES[name], "_cache_size"):
        assert _PROBES[name]._cache_size() == 1  # three weights, one compilation


def test_new_guidance_weight_does_not_retrace():
    model, variables = _model("dit"), _variables("dit")
    traces = []

    def denoiser_fn(params):
        traces.append(1)  # runs only while tracing
        return from_flax(model, {"params": params}, SCHEDULE, pred_type="eps")

    mesh = parallel.make_mesh()
    fn = sampling.make_sample_fn(denoiser_fn, image_shape=(H, H, C), num_classes=K,
                                 sampler="ddim", num_steps=2, batch_size=8, mesh=mesh,
                                 options={"eta": 0.0, "spacing": "trailing"})
    key = jax.random.key(3)
    x = {w: np.asarray(fn(variables["params"], key, jnp.int32(0), jnp.float32(w)))
         for w in (1.0, 2.0, 4.5)}
    assert len(traces) == 1
    if hasattr(fn, "_cache_size"):
        assert fn._cache_size() == 1
    assert np.abs(x[1.0] - x[4.5]).mean() > 1e-4, "the guidance weight must be used"
    # Labels are (offset + i) % K: sample 4 repeats sample 0's class with other noise.
    assert not np.allclose(x[2.0][0], x[2.0][4])


def test_label_dropout_replaces_labels_by_null():
    y = jnp.arange(1000, dtype=jnp.int32) % K
    dropped = np.asarray(drop_labels(jax.random.key(4), y, 0.1))
    null = dropped == -1
    assert 0.05 < null.mean() < 0.15
    np.testing.assert_array_equal(dropped[~null], np.asarray(y)[~null])
    np.testing.assert_array_equal(drop_labels(jax.random.key(4), y, 0.0), y)


def _build(devices, workdir):
    # The config of tests/test_fsdp.py's single-device run, so that its compilations
    # are shared through the persistent cache.
    cfg = get_config("runlocal")
    cfg.conditioning.label_dropout = 0.5  # many null labels in a batch of 8
    cfg.model.dtype = "float32"
    cfg.model.dit.depth = 1
    return build_run(cfg, workdir, devices)


def test_conditional_dit_train_step_eight_devices_equal_one(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    run1 = _build(jax.devices()[:1], str(tmp_path / "one"))
    run8 = _build(jax.devices(), str(tmp_path / "eight"))
    assert run1.num_classes == 10
    state1 = jax.jit(run1.init_fn, out_shardings=run1.state_sharding)(jax.random.key(0))
    # The same start, replicated on 8; from a copy, since device_put may alias the
    # buffers that run1's donation deletes.
    state8 = jax.device_put(jax.tree.map(lambda x: x.copy(), state1), run8.state_sharding)
    l1, s1 = train_steps(run1, state1, 2)
    l8, s8 = train_steps(run8, state8, 2)
    p1, p8 = jax.device_get(s1.params), jax.device_get(s8.params)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p8, p1)
    assert l1[0] != l1[1], "successive steps should see different batches and noise"
