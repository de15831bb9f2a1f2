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
from diffusion import parallel, sampling
from diffusion.denoiser import Denoiser, from_flax
from diffusion.models import DiT, UNet
from diffusion.samplers.options import dynamic_threshold, with_dynamic_thresholding
from diffusion.schedules import Schedule, make_schedule
from diffusion.train.setup import build_run
from diffusion.train_state import drop_labels

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
    # x0 = (x_t - sigma eps) / alpha reaches ~1e2 here; w = 1 runs a batch-B call, not
    # the batch-2B one of cond_x0, so allow float32 rounding relative to the size.
    np.testing.assert_allclose(one["guided_x0"], one["cond_x0"], rtol=1e-5, atol=1e-4)
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


# ---- guidance in the network's own parameterisation (issue 9) -------------------------
# Fake networks: plain jnp functions of (x, c_noise, y), so no compile of a real model.

MU = jnp.array([-1.5, 0.5, 2.0], jnp.float32)  # class k's data is the constant image MU[k]


def _class_mean(y):
    """E[x0 | y] for the 3-class delta mixture; a negative label is the null class."""
    return jnp.where(y >= 0, MU[jnp.clip(y, 0, 2)], MU.mean())


def _exact_v_net(schedule):
    """v-prediction of a model whose x0 is E[x0 | y]: exact at t = 1, where x_t is noise."""
    def net_fn(x, c_noise, y):
        t = (c_noise + 1.0) / schedule.T
        a = schedule.alpha(t)[:, None, None, None]
        s = schedule.sigma(t)[:, None, None, None]
        x0 = jnp.broadcast_to(_class_mean(y)[:, None, None, None], x.shape)
        eps = (x - a * x0) / s
        return a * eps - s * x0
    return net_fn


def test_guided_x0_at_zero_terminal_snr_is_finite_and_guided():
    # Zero terminal SNR, v-prediction: alpha(1) ~ 0, so rebuilding x0 from the guided eps
    # as (x_t - sigma eps) / alpha gave x0 = 0 at t = 1 (1-step class accuracy 0.10).
    # alpha_bar(1) = 0 exactly (the table's floor then gives alpha(1) ~ 1e-10), whatever
    # floor make_schedule's zero-SNR rescaling chooses.
    table = make_schedule("linear", 100).alpha_bar_table.copy()
    table[-1] = 0.0
    sched = Schedule(name="linear_zero_snr_exact", alpha_bar_table=table)
    assert float(sched.alpha(jnp.ones(1))[0]) < 1e-6
    den = Denoiser(_exact_v_net(sched), sched, pred_type="v")
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    y = jnp.array([0, 1, 2], jnp.int32)
    want_cond = np.broadcast_to(np.asarray(MU)[:, None, None, None], x.shape)
    for w in (1.0, 2.5):
        x0 = np.asarray(den.predict(x, 1.0, y, jnp.float32(w)).x0)
        want = MU.mean() + w * (want_cond - MU.mean())
        np.testing.assert_allclose(x0, want, atol=1e-4, err_msg=f"w={w}")


def _recording_net(seen: list):
    """A fake eps/x0/v net that records, when it runs, the batch size it was given."""
    def net_fn(x, c_noise, y):
        jax.debug.callback(lambda n: seen.append(int(n)), jnp.int32(x.shape[0]))
        yy = jnp.where(y >= 0, y, 7).astype(jnp.float32)[:, None, None, None]
        return jnp.tanh(x * (1.0 + 0.1 * yy) + 0.01 * c_noise[:, None, None, None]) + 0.2 * yy
    return net_fn


def test_guidance_weight_one_runs_only_the_conditional_pass():
    seen = []
    den = Denoiser(_recording_net(seen), SCHEDULE, pred_type="eps")
    x = jax.random.normal(jax.random.key(1), (B, 2, 2, 1))
    y = jnp.arange(B, dtype=jnp.int32) % K
    predict = jax.jit(lambda w: den.predict(x, 0.5, y, w))
    one = predict(jnp.float32(1.0))  # traced w: lax.cond takes the one-pass branch
    jax.effects_barrier()
    assert seen == [B], seen
    seen.clear()
    predict(jnp.float32(2.0))
    jax.effects_barrier()
    assert seen == [2 * B], seen
    seen.clear()
    plain = den.predict(x, 0.5, y)  # unguided conditional
    static = den.predict(x, 0.5, y, 1.0)  # a Python w = 1: decided while tracing
    jax.effects_barrier()
    assert seen == [B, B], seen
    for got in (one, static):
        np.testing.assert_allclose(got.eps, plain.eps, atol=1e-6)
        np.testing.assert_allclose(got.x0, plain.x0, atol=1e-5)


@pytest.mark.parametrize("pred_type", ["eps", "x0", "v"])
def test_guidance_in_each_parameterisation_equals_eps_guidance(pred_type):
    # Conversion to eps is affine in the prediction at fixed x_t, so where alpha > 0
    # guiding eps, x0 or v is one and the same guidance.
    den = Denoiser(_recording_net([]), SCHEDULE, pred_type=pred_type)
    x = jax.random.normal(jax.random.key(2), (B, 2, 2, 1))
    t = jnp.array([0.1, 0.3, 0.6, 0.9])
    y = jnp.arange(B, dtype=jnp.int32) % K
    w = 3.0
    cond = den.predict(x, t, y).eps
    uncond = den.predict(x, t, jnp.full_like(y, -1)).eps
    guided = den.predict(x, t, y, jnp.float32(w)).eps
    np.testing.assert_allclose(guided, uncond + w * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_guide_channels_guides_only_the_first_channels_like_official_dit():
    # DiT's forward_with_cfg guides eps channels [0:3] of 4 and takes the conditional
    # value of the rest (the 4th eps channel and the variance output).
    def net_fn(x, c_noise, y):
        yy = jnp.where(y >= 0, y + 1.0, 0.0)[:, None, None, None]
        return jnp.concatenate([x * 0 + yy + jnp.arange(4.0), x * 0 - 0.1 * yy], axis=-1)
    x = jnp.zeros((2, 2, 2, 4))
    y = jnp.array([1, 2], jnp.int32)
    w = 4.0
    full = Denoiser(net_fn, SCHEDULE, "eps", learned_sigma=True)
    part = Denoiser(net_fn, SCHEDULE, "eps", learned_sigma=True, guide_channels=3)
    cond, uncond = full.predict(x, 0.5, y), full.predict(x, 0.5, jnp.full_like(y, -1))
    g_full = full.predict(x, 0.5, y, jnp.float32(w))
    g_part = part.predict(x, 0.5, y, jnp.float32(w))
    guided = uncond.eps + w * (cond.eps - uncond.eps)
    np.testing.assert_allclose(g_full.eps, guided, atol=1e-5)
    np.testing.assert_allclose(g_part.eps[..., :3], guided[..., :3], atol=1e-5)
    np.testing.assert_allclose(g_part.eps[..., 3:], cond.eps[..., 3:], atol=1e-5)
    np.testing.assert_allclose(g_part.var_out, cond.var_out, atol=1e-6)
    with pytest.raises(ValueError, match="guide_channels"):
        Denoiser(net_fn, SCHEDULE, "eps", learned_sigma=True,
                 guide_channels=5).predict(x, 0.5, y, jnp.float32(w))


def test_dynamic_thresholding_wraps_the_guided_prediction():
    den = Denoiser(_recording_net([]), SCHEDULE, pred_type="v")
    x = 3.0 * jax.random.normal(jax.random.key(3), (B, 2, 2, 1))
    y = jnp.arange(B, dtype=jnp.int32) % K
    inner = den.predict(x, 0.5, y, jnp.float32(5.0))
    got = with_dynamic_thresholding(den, 0.9).predict(x, 0.5, y, jnp.float32(5.0))
    np.testing.assert_allclose(got.x0, dynamic_threshold(inner.x0, 0.9), atol=1e-6)
    assert np.isfinite(np.asarray(got.eps)).all()


def test_sample_guidance_channels_reaches_the_denoiser():
    from types import SimpleNamespace
    from diffusion.objectives.diffusion import diffusion_denoiser
    cfg = get_config("runlocal")
    run = SimpleNamespace(config=cfg, model=None, schedule=SCHEDULE)
    assert cfg.sample.guidance_channels == 0  # 0 = every channel
    assert diffusion_denoiser(run, None).guide_channels is None
    cfg.sample.guidance_channels = 3          # official DiT: 3 of 4 latent channels
    assert diffusion_denoiser(run, None).guide_channels == 3
