"""EDM and consistency models: boundary condition, the Denoiser bridge, the EDM loss and
the CD loss against closed forms for Gaussian data, curricula, 8 devices = 1 for a CT
and a CD step, the CD teacher glue, and a tiny end-to-end CT run."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion import parallel
from diffusion.consistency import bridge, edm
from diffusion.consistency import losses as cm
from diffusion.consistency.losses import ConsistencySpec
from diffusion.denoiser import Denoiser
from diffusion.objectives.consistency import make_consistency_train_step
from diffusion.objectives.edm import make_edm_train_step
from diffusion.schedules import make_schedule
from diffusion.train_state import init_state

SMIN, SMAX, SD = edm.SIGMA_MIN, edm.SIGMA_MAX, edm.SIGMA_DATA
CM_PRECOND = edm.Precond(consistency=True)


def _random_net(key):
    """A fixed random nonlinear F(x_in, t, y) with large outputs."""
    w = jax.random.normal(key, (3,))
    return lambda x, t, y: 100.0 * jnp.tanh(w[0] * x + w[1]) + w[2] * t[:, None, None, None]


# ---- preconditioning and bridge ------------------------------------------------------

def test_boundary_condition_is_exact_at_sigma_min():
    x = 3.0 * jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
    net = _random_net(jax.random.key(1))
    sigma0 = [jnp.full((4,), SMIN)] + [cm.karras_sigma(jnp.zeros(4, jnp.int32), n, SMIN, SMAX, 7.0)
                                       for n in (2, 18, 1281)]
    jitted = jax.jit(edm.denoise, static_argnums=(0, 4))
    for s in sigma0:
        for fn in (edm.denoise, jitted):
            np.testing.assert_array_equal(np.asarray(fn(net, x, s, None, CM_PRECOND)),
                                          np.asarray(x))
    c_skip, c_out, _ = edm.consistency_scalings(jnp.float32(SMIN))
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    # EDM's own preconditioning has no such boundary; above sigma_min neither does CM's.
    assert not np.allclose(edm.denoise(net, x, sigma0[0], None, edm.Precond()), x)
    assert not np.allclose(edm.denoise(net, x, jnp.full((4,), 0.01), None, CM_PRECOND), x)


def test_karras_grid_ends_exactly_and_is_increasing():
    for n in (2, 11, 18, 1281):
        s = np.asarray(cm.karras_sigma(jnp.arange(n), n, SMIN, SMAX, 7.0))
        assert s[0] == np.float32(SMIN) and s[-1] == np.float32(SMAX)
        assert np.all(np.diff(s) > 0)
        np.testing.assert_allclose(s, bridge.karras_grid(n, SMIN, SMAX, 7.0), rtol=1e-5)


def test_bridge_denoiser_gives_D():
    """The VP Denoiser over D returns D(x_t / alpha, sigma_ve), for sigma in [0.002, 80]."""
    sched = bridge.ve_schedule(1000, SMIN, SMAX, 7.0)
    t_ends = jnp.array([1.0 / sched.T, 1.0])
    np.testing.assert_allclose(bridge.ve_sigma(sched, t_ends), [SMIN, SMAX], rtol=1e-5)
    net = _random_net(jax.random.key(2))
    d_fn = lambda x, s, y: edm.denoise(net, x, s, y, CM_PRECOND)
    den = bridge.ve_denoiser(d_fn, sched)
    sigma = jnp.exp(jnp.linspace(math.log(SMIN), math.log(SMAX), 16))
    t = sched.t_from_ve_sigma(sigma)
    np.testing.assert_allclose(bridge.ve_sigma(sched, t), sigma, rtol=2e-5)
    x_t = jax.random.normal(jax.random.key(3), (16, 4, 4, 1))
    x0 = den.predict(x_t, t).x0
    alpha = sched.alpha(t)[:, None, None, None]
    expected = d_fn(x_t / alpha, bridge.ve_sigma(sched, t), None)
    np.testing.assert_allclose(x0, expected, rtol=1e-5, atol=1e-5)
    # ... and sigma_space_x0 (how a CD teacher is read) inverts the bridge.
    x_ve = x_t * sigma[:, None, None, None]
    np.testing.assert_allclose(bridge.sigma_space_x0(den, x_ve, sigma),
                               d_fn(x_ve, sigma, None), rtol=1e-4, atol=1e-4)


def test_bridge_guidance_combines_conditional_and_unconditional_x0():
    """CFG through Denoiser.predict: eps is affine in x0 at fixed (x_t, t), so guidance
    w in eps space is x0_u + w (x0_c - x0_u) in x0 space."""
    sched = bridge.ve_schedule(1000, SMIN, SMAX, 7.0)
    d_fn = lambda x, s, y: 0.5 * x + jnp.where(y >= 0, y + 1.0, 0.0)[:, None, None, None]
    den = bridge.ve_denoiser(d_fn, sched)
    x_t = jax.random.normal(jax.random.key(10), (3, 2, 2, 1))
    y, t = jnp.array([0, 1, 2]), jnp.full((3,), 0.6)
    x0_c = den.predict(x_t, t, y).x0
    x0_u = den.predict(x_t, t, jnp.full((3,), -1)).x0
    for w in (0.0, 1.0, 2.5):
        np.testing.assert_allclose(den.predict(x_t, t, y, guidance=w).x0,
                                   x0_u + w * (x0_c - x0_u), rtol=1e-4, atol=1e-4)


def test_teacher_schedule_must_reach_sigma_max():
    bridge.check_sigma_range(make_schedule("linear", 1000), SMIN, SMAX)  # reaches ~157
    with pytest.raises(ValueError, match="sigma_max"):
        bridge.check_sigma_range(make_schedule("scaled_linear", 1000), SMIN, SMAX)


# ---- EDM loss and CD loss against Gaussian closed forms ------------------------------

def test_edm_loss_of_exact_denoiser_is_one_for_unit_variance_data():
    """Data N(0, sd^2): E loss of the optimal denoiser is 1 at every sigma (EDM's design)."""
    x0 = SD * jax.random.normal(jax.random.key(4), (4096, 4, 4, 1))
    exact = lambda x, s: x * (SD ** 2 / (SD ** 2 + s ** 2))[:, None, None, None]
    loss, sigma = edm.edm_loss(exact, x0, jax.random.key(5))
    assert abs(float(jnp.mean(loss)) - 1.0) < 0.03  # MC std ~0.006
    assert abs(float(jnp.mean(jnp.log(sigma))) + 1.2) < 0.1


MU, S = 0.3, 0.4  # data N(MU, S^2 I)


def _exact_f(x, sigma, s=S):
    """The exact consistency function of N(MU, s^2) data (boundary at sigma_min)."""
    r = jnp.sqrt(s ** 2 + SMIN ** 2) / jnp.sqrt(s ** 2 + sigma ** 2)
    return MU + r[:, None, None, None] * (x - MU)


def _exact_teacher(x, sigma):
    return MU + (S ** 2 / (S ** 2 + sigma ** 2))[:, None, None, None] * (x - MU)


def _closed_form_pair_loss(solver, sig_n, sig_n1):
    """E d_l2(f(x_{n+1}), f(step(x_{n+1}))) at the exact f: r_n^2 delta^2 (S^2 + s_{n+1}^2),
    delta = (one solver step's growth factor) - (the exact ODE's), in float64."""
    a = lambda s: s / (S ** 2 + s ** 2)  # dy/dsigma = a(sigma) y, y = x - MU
    h = sig_n - sig_n1
    if solver == "euler":
        g = 1 + h * a(sig_n1)
    else:
        g = 1 + 0.5 * h * (a(sig_n1) + a(sig_n) * (1 + h * a(sig_n1)))
    exact = np.sqrt(S ** 2 + sig_n ** 2) / np.sqrt(S ** 2 + sig_n1 ** 2)
    r_n = np.sqrt(S ** 2 + SMIN ** 2) / np.sqrt(S ** 2 + sig_n ** 2)
    return r_n ** 2 * (g - exact) ** 2 * (S ** 2 + sig_n1 ** 2)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_cd_pair_loss_at_exact_function_is_the_solver_error(solver):
    """At the exact consistency function the CD loss is only the ODE step's error: per
    pair it matches the closed form, it shrinks like h^4 (Euler) or h^6 (Heun) when N
    doubles, and with Heun it is ~200 times below the loss of a wrong function (the
    exact denoiser, which is not a consistency function). Any smooth wrong f has a pair
    loss of order h^2 (adjacent levels), the exact f only the step's O(h^6)."""
    b = 2048
    z = jax.random.normal(jax.random.key(6), (b, 2, 2, 1))
    x0 = MU + S * jax.random.normal(jax.random.key(7), (b, 2, 2, 1))
    means = {}
    for n_scales in (18, 35):  # 35 points halve every step of the 18-point grid
        grid = bridge.karras_grid(n_scales, SMIN, SMAX, 7.0)
        measured, predicted, wrong = [], [], []
        for n in range(n_scales - 1):
            s_n, s_n1 = jnp.full((b,), grid[n]), jnp.full((b,), grid[n + 1])
            x_n1 = x0 + s_n1[:, None, None, None] * z
            x_n = cm.ode_step(solver, _exact_teacher, x_n1, s_n1, s_n)
            measured.append(float(jnp.mean(cm.distance("l2", _exact_f(x_n1, s_n1),
                                                       _exact_f(x_n, s_n)))))
            wrong.append(float(jnp.mean(cm.distance("l2", _exact_teacher(x_n1, s_n1),
                                                    _exact_teacher(x_n, s_n)))))
            predicted.append(_closed_form_pair_loss(solver, grid[n], grid[n + 1]))
        measured, predicted = np.array(measured), np.array(predicted)
        # Per pair: within Monte-Carlo error (b * 4 chi-square samples: ~3%) of the
        # closed form, or below float32 round-off (~1e-11 for values of size <= 80).
        ok = np.abs(measured - predicted) <= 0.1 * predicted + 1e-10
        assert ok.all(), (n_scales, measured[~ok], predicted[~ok])
        means[n_scales] = (measured.mean(), np.mean(wrong))
    (m18, w18), (m35, _) = means[18], means[35]
    # Local error O(h^(p+1)) squared: the loss falls by 2^(2p+2) (16 Euler, 64 Heun).
    p = 1 if solver == "euler" else 2
    assert m18 / m35 > 0.5 * 2 ** (2 * p + 2)
    if solver == "heun":  # the mean at N = 18 is 8.5e-6 (closed form)
        assert m18 < 1e-5 and m18 < 0.01 * w18
    else:  # Euler's error at N = 18 is far larger (6e-5), yet below the wrong f's
        assert m18 < 0.1 * w18


class _ExactNet(nn.Module):
    """F such that the consistency-preconditioned D is the exact consistency function of
    N(MU, S^2) data (or, with denoiser=True, the exact denoiser: a wrong answer)."""
    denoiser: bool = False

    @nn.compact
    def __call__(self, x_in, t, y=None, train=False):
        bias = self.param("bias", nn.initializers.zeros, ())
        sigma = jnp.exp(4.0 * t / edm.NET_T_SCALE)
        x = x_in * jnp.sqrt(sigma ** 2 + SD ** 2)[:, None, None, None]
        c_skip, c_out, _ = edm.consistency_scalings(sigma)
        c_skip, c_out = c_skip[:, None, None, None], c_out[:, None, None, None]
        safe = jnp.where(c_out > 0, c_out, 1.0)
        f = _exact_teacher(x, sigma) if self.denoiser else _exact_f(x, sigma)
        return jnp.where(c_out > 0, (f - c_skip * x) / safe, 0.0) + bias


def _gaussian_cd_loss(denoiser_net: bool):
    model = _ExactNet(denoiser=denoiser_net)
    tx = optax.sgd(0.0)
    spec = ConsistencySpec(total_steps=10, num_scales=18, distance="l2", ode_solver="heun")
    step = make_consistency_train_step(
        model, tx, lambda k: 0.0, spec=spec, precond=CM_PRECOND, num_classes=0,
        label_dropout=0.0, ema_rate=0.9, ema_warmup=False,
        teacher_fn=lambda p, x, s, y: _exact_teacher(x, s))
    state = init_state(model, tx, jax.random.key(0), (2, 2, 1), 0)
    state = state.replace(aux={"teacher": {}, "target": state.params})
    x0 = MU + S * jax.random.normal(jax.random.key(8), (1024, 2, 2, 1))
    _, metrics = jax.jit(step)(state, {"image": x0, "label": jnp.zeros(1024, jnp.int32)})
    return float(metrics["loss"])


def test_cd_train_step_loss_vanishes_at_exact_function():
    """The whole CD step (index sampling, Heun step of the exact teacher, target net,
    distance): ~0 at the exact consistency function (expected 8.5e-6, the Heun error
    averaged over the 17 pairs of N = 18), clearly positive for a wrong function."""
    exact, wrong = _gaussian_cd_loss(False), _gaussian_cd_loss(True)
    print("step-level CD loss: exact", exact, "wrong", wrong)
    assert exact < 3e-5
    assert wrong > 1e-3 and wrong > 30 * exact


# ---- curricula -----------------------------------------------------------------------

def test_curricula():
    k = jnp.arange(0, 1001, 100)
    n_ct = np.asarray(cm.ct_num_scales(k, 1000, 2, 150))
    assert n_ct[0] == 2 and n_ct[-1] == 151 and np.all(np.diff(n_ct) >= 0)
    expected = [math.ceil(math.sqrt(kk / 1000 * (151 ** 2 - 4) + 4) - 1) + 1
                for kk in range(0, 1001, 100)]
    np.testing.assert_array_equal(n_ct, expected)
    mu = np.asarray(cm.ct_target_ema(n_ct, 2, 0.9))
    np.testing.assert_allclose(mu, np.exp(2 * np.log(0.9) / n_ct), rtol=1e-6)
    # iCT: K' = floor(800 / 8) = 100; N = min(10 * 2^floor(k / 100), 1280) + 1.
    n_ict = np.asarray(cm.ict_num_scales(jnp.array([0, 99, 100, 250, 699, 700, 799, 5000]),
                                         800, 10, 1280))
    np.testing.assert_array_equal(n_ict, [11, 11, 21, 41, 641, 1281, 1281, 1281])


def test_lognormal_index_sampling_respects_N_and_favours_middle_noise():
    n = cm.sample_index(jax.random.key(9), 20000, jnp.int32(41), 1281, method="lognormal",
                        sigma_min=SMIN, sigma_max=SMAX, rho=7.0)
    n = np.asarray(n)
    assert n.min() >= 0 and n.max() <= 39
    grid = bridge.karras_grid(41, SMIN, SMAX, 7.0)
    mid = np.log(0.5 * (grid[n] + grid[n + 1]))
    assert abs(np.median(mid) + 1.1) < 0.5  # the lognormal's median log sigma


# ---- 8 devices = 1 -------------------------------------------------------------------

class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, t, y=None, train=False):
        emb = nn.Dense(8)(jnp.stack([jnp.sin(t / 300.0), jnp.cos(t / 300.0)], -1))
        h = nn.silu(nn.Conv(8, (3, 3))(x) + emb[:, None, None, :])
        h = nn.Dropout(0.2, deterministic=not train)(h)
        return nn.Conv(x.shape[-1], (3, 3))(h)


def _one_step(devices, teacher: bool):
    model, tx = _TinyNet(), optax.adam(1e-3)
    shape = (8, 8, 1)
    mesh = parallel.make_mesh(devices)
    teacher_fn, aux = None, {}
    state = init_state(model, tx, jax.random.key(0), shape, 0)
    if teacher:
        sched = make_schedule("linear", 100)
        t_params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1,) + shape),
                                       jnp.zeros(1))["params"]
        aux["teacher"] = t_params

        def teacher_fn(p, x, s, y):
            net = lambda x_t, c, y_: model.apply({"params": p}, x_t, c, y_)
            return bridge.sigma_space_x0(Denoiser(net, sched, "eps"), x, s, y)
        spec = ConsistencySpec(total_steps=10, num_scales=18, ode_solver="heun")
    else:
        spec = ConsistencySpec(total_steps=10, curriculum="ct", s0=2, s1=150,
                               target_schedule="ct", target_ema=0.9,
                               index_sampling="lognormal", weighting="inverse_step")
    aux["target"] = jax.tree.map(lambda a: a + 0.01, state.params)  # != online, to test EMA
    state = state.replace(aux=aux, step=jnp.int32(5))
    step = make_consistency_train_step(model, tx, lambda k: 1e-3, spec=spec, precond=CM_PRECOND,
                                       num_classes=0, label_dropout=0.0, ema_rate=0.99,
                                       ema_warmup=False, teacher_fn=teacher_fn)
    repl, data = parallel.replicated(mesh), parallel.data_sharded(mesh)
    x0 = jnp.tanh(jax.random.normal(jax.random.key(2), (8,) + shape))
    batch = jax.device_put({"image": x0, "label": jnp.zeros(8, jnp.int32)}, data)
    state = jax.device_put(state, repl)
    step = jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl))
    new, metrics = step(state, batch)
    return jax.device_get((new.params, new.aux["target"], new.ema_params, metrics))


@pytest.mark.parametrize("teacher", [False, True], ids=["ct", "cd"])
def test_step_on_eight_devices_equals_one(teacher):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    one = _one_step(jax.devices()[:1], teacher)
    eight = _one_step(jax.devices(), teacher)
    assert np.isfinite(one[3]["loss"]) and one[3]["loss"] > 0
    np.testing.assert_allclose(eight[3]["loss"], one[3]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eight[:3]), jax.tree.leaves(one[:3])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_edm_step_runs():
    model, tx = _TinyNet(), optax.adam(1e-3)
    state = init_state(model, tx, jax.random.key(0), (8, 8, 1), 0)
    step = jax.jit(make_edm_train_step(model, tx, lambda k: 1e-3, precond=edm.Precond(),
                                       p_mean=-1.2, p_std=1.2, num_classes=0,
                                       label_dropout=0.0, ema_rate=0.9, ema_warmup=False))
    x0 = jnp.tanh(jax.random.normal(jax.random.key(2), (8, 8, 8, 1)))
    new, metrics = step(state, {"image": x0, "label": jnp.zeros(8, jnp.int32)})
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert all(k in metrics for k in ("loss_t0", "loss_t3", "grad_norm"))


# ---- objectives through the training stack -------------------------------------------

def _fake_state(run, seed=0):
    """A concrete state shaped like run.abstract_state with random values, made without
    compiling the network's init (which costs far more than these tests need)."""
    rng = np.random.default_rng(seed)

    def leaf(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            x = jax.random.key(seed)
        elif jnp.issubdtype(a.dtype, jnp.floating):
            x = rng.normal(size=a.shape).astype(a.dtype)
        else:
            x = np.zeros(a.shape, a.dtype)
        return jax.device_put(x, a.sharding)
    return jax.tree.map(leaf, run.abstract_state)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(x, y)


def test_ct_target_network_starts_equal_to_online(tmp_path):
    from configs import ct_fashion_mnist
    from diffusion.train.setup import build_run
    cfg = ct_fashion_mnist.get_config("runlocal")
    cfg.consistency.update(curriculum="ct", s0=2, s1=150, target_ema_schedule="ct",
                           target_ema=0.9)
    run = build_run(cfg, str(tmp_path))
    assert "target" in run.abstract_state.aux
    state = run.objective.init_aux(run, _fake_state(run).replace(aux={}))
    _assert_trees_equal(state.aux["target"], state.params)


def _smaller(c):
    """Fewer arrays: orbax's per-array cost dominates the teacher tests otherwise."""
    c.model.unet.update(ch_mult=(1,), attn_resolutions=())
    return c


def _saved_teacher(t_cfg, t_dir: str):
    """A teacher workdir (config.json and one checkpoint at step 7 of a fake state) of
    the smaller `t_cfg`; returns the state saved."""
    from diffusion.config_file import write_config
    from diffusion.train.setup import build_run
    t_cfg = _smaller(t_cfg)
    t_run = build_run(t_cfg, t_dir)
    t_state = _fake_state(t_run, seed=1)
    write_config(t_cfg, t_dir)
    t_run.checkpointer.save(7, t_state)
    t_run.checkpointer.wait()
    t_run.checkpointer.close()
    return t_state


def test_cd_loads_its_teacher_and_starts_from_it(tmp_path):
    """A teacher workdir written by this codebase (EDM, tiny) -> aux['teacher'] holds its
    EMA params; with init_from_teacher online, target and EMA params all start there."""
    from configs import cd_fashion_mnist, edm_fashion_mnist
    from diffusion.objectives.consistency import teacher_fn
    from diffusion.train.setup import build_run

    t_dir = str(tmp_path / "teacher")
    t_state = _saved_teacher(edm_fashion_mnist.get_config("runlocal"), t_dir)

    cfg = _smaller(cd_fashion_mnist.get_config("runlocal"))
    with pytest.raises(ValueError, match="teacher_workdir is empty"):
        build_run(cfg, str(tmp_path / "no_teacher"))
    cfg.consistency.teacher_workdir = t_dir
    run = build_run(cfg, str(tmp_path / "student"))
    assert run.teacher.step is None  # by shape (diffusion.load, restore=False)
    state = run.objective.prepare(run, _fake_state(run, seed=2))
    _assert_trees_equal(state.aux["teacher"], t_state.ema_params)
    for tree in (state.params, state.ema_params, state.aux["target"]):
        _assert_trees_equal(tree, t_state.ema_params)
    # The teacher as the step sees it: a sigma-space x0 of the right shape (traced only).
    x = jnp.zeros((2,) + run.image_shape)
    x0 = jax.eval_shape(teacher_fn(run), state.aux["teacher"], x, jnp.array([0.5, 20.0]),
                        None)
    assert x0.shape == x.shape and x0.dtype == jnp.float32
    # A student resumes from its own checkpoint: the teacher's checkpoints may be gone,
    # its config.json alone gives the teacher's params their shapes.
    import shutil
    shutil.rmtree(os.path.join(t_dir, "checkpoints"))
    again = build_run(cfg, str(tmp_path / "student"))
    assert (jax.tree.map(lambda a: a.shape, again.abstract_state.aux["teacher"])
            == jax.tree.map(lambda a: a.shape, run.abstract_state.aux["teacher"]))
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        again.objective.prepare(again, _fake_state(again, seed=2))


def test_diffusion_parameterised_student_starts_as_its_v_prediction_teacher(tmp_path):
    """consistency.parameterisation 'diffusion' (configs/cd_fashion_mnist.py:teacher=
    default): a student started from a v-prediction teacher is c_skip x + (1 - c_skip)
    times the teacher's x0 at every sigma, and exactly x at sigma_min."""
    from configs import cd_fashion_mnist, default
    from diffusion.consistency.edm import consistency_scalings
    from diffusion.objectives.consistency import teacher_fn
    from diffusion.objectives.edm import flax_net_fn, sigma_space_fn
    from diffusion.train.setup import build_run

    t_dir = str(tmp_path / "teacher")
    t_state = _saved_teacher(default.get_config("runlocal"), t_dir)

    cfg = _smaller(cd_fashion_mnist.get_config("teacher=default,runlocal"))
    cfg.consistency.teacher_workdir = t_dir
    assert cfg.diffusion.pred_type == "v" and cfg.consistency.parameterisation == "diffusion"
    run = build_run(cfg, str(tmp_path / "student"))
    state = run.objective.prepare(run, _fake_state(run, seed=2))
    _assert_trees_equal(state.params, t_state.ema_params)
    x = jax.random.normal(jax.random.key(3), (3,) + run.image_shape)
    sigma = jnp.array([0.3, 2.0, 40.0])
    f = jax.jit(lambda p, x, s: sigma_space_fn(run, True)(
        flax_net_fn(run.model, p), x, s, None))
    x0_teacher = jax.jit(teacher_fn(run))(state.aux["teacher"], x, sigma, None)
    c_skip = consistency_scalings(sigma)[0][:, None, None, None]
    np.testing.assert_allclose(f(state.params, x, sigma),
                               c_skip * x + (1 - c_skip) * x0_teacher, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(f(state.params, x, jnp.full(3, 0.002)), x)
    # Another reading of the network than the teacher's is refused at the start.
    cfg.diffusion.pred_type = "eps"
    other = build_run(cfg, str(tmp_path / "eps_student"))
    with pytest.raises(ValueError, match="diffusion.pred_type='eps' but the teacher's is 'v'"):
        other.objective.prepare(other, _fake_state(other, seed=2))
    edm = _smaller(cd_fashion_mnist.get_config("teacher=default,runlocal"))
    edm.train.objective = "edm"
    edm_run = build_run(edm, str(tmp_path / "edm"))
    with pytest.raises(ValueError, match="for the consistency objectives"):
        edm_run.objective.make_step(edm_run)


def test_ct_runlocal_trains_end_to_end(tmp_path):
    """configs/ct_fashion_mnist.py:runlocal: a few steps on synthetic data, a checkpoint
    and a 1-step consistency sample grid."""
    import os
    from configs import ct_fashion_mnist
    from diffusion.train import train_and_evaluate
    cfg = ct_fashion_mnist.get_config("runlocal")
    cfg.train.num_steps = 2
    cfg.train.log_every = 1
    cfg.train.sample_every = 2
    metrics = train_and_evaluate(cfg, str(tmp_path))
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])
    # iCT with K = 2: K' = 1, so the logged step (k = 1) has N = 10 * 2 + 1
    assert metrics["num_scales"] == 21 and metrics["target_ema"] == 0.0
    assert os.path.exists(tmp_path / "checkpoints" / "2")
    assert any(f.startswith("samples_ema") for f in os.listdir(tmp_path / "samples"))
