"""Reflow: the pairs file round-trips through its data source and the batch iterator
(deterministic, resumable, noise beside each image), and the reflow step on the exact
straight couplings of a Gaussian goes below the least loss any model reaches on
independent couplings, and its one-step samples land on the exact ODE's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion import flow_matching as fm
from diffusion.analytic.exact import exact_path_flow_map, exact_velocity
from diffusion.analytic.gmm import sample as gmm_sample
from diffusion.analytic.problems import make_problem
from diffusion.data import BatchIterator, make_source
from diffusion.data.pairs import PairWriter, labels_path, write_pairs
from diffusion.objectives.flow import make_flow_train_step
from diffusion.paths import FlowPath
from diffusion.train_state import init_state

FLOW = FlowPath()


# ---- the pairs file ----------------------------------------------------------------------

def _pairs(n=20, shape=(4, 4, 1)):
    rng = np.random.default_rng(0)
    return (rng.uniform(-1, 1, (n, *shape)).astype(np.float32),
            rng.normal(size=(n, *shape)).astype(np.float32))


def test_pairs_round_trip_through_the_source_and_the_iterator(tmp_path):
    x0, eps = _pairs()
    labels = np.arange(20, dtype=np.int32) % 3
    path = str(tmp_path / "pairs.npy")
    write_pairs(path, x0, eps, labels)
    src = make_source(f"pairs:{path}")
    assert (len(src), src.image_shape, src.num_classes) == (20, (4, 4, 1), 3)
    got = src.get(np.array([5, 2, 5]))
    np.testing.assert_array_equal(got["image"], x0[[5, 2, 5]])
    np.testing.assert_array_equal(got["label"], labels[[5, 2, 5]])
    it = BatchIterator(src, 8, seed=1)
    batches = [next(it) for _ in range(5)]  # 40 positions: two epochs
    for step, batch in enumerate(batches):
        idx = it.indices_at(step)
        np.testing.assert_array_equal(batch["image"], x0[idx])
        np.testing.assert_array_equal(batch["noise"], eps[idx])
        np.testing.assert_array_equal(batch["label"], labels[idx])
    assert len({tuple(it.indices_at(s)) for s in range(3)}) == 3
    resumed = next(BatchIterator(src, 8, seed=1, start_step=3))
    for key in ("image", "noise", "label"):
        np.testing.assert_array_equal(resumed[key], batches[3][key])
    # unlabelled pairs replace a labelled file and its labels
    write_pairs(path, x0, eps)
    src = make_source(f"pairs:{path}")
    assert src.num_classes == 0 and np.all(src.get([0, 1])["label"] == -1)
    assert not (tmp_path / "pairs.labels.npy").exists()


def test_pair_writer_publishes_only_a_complete_file(tmp_path):
    x0, eps = _pairs(6)
    path = str(tmp_path / "p.npy")
    w = PairWriter(path, 6, (4, 4, 1), with_labels=True)
    w.write(0, x0[:4], eps[:4], np.zeros(4, np.int32))
    assert not (tmp_path / "p.npy").exists() and not (tmp_path / "p.labels.npy").exists()
    w.write(4, x0[4:], eps[4:], np.ones(2, np.int32))
    assert w.close() == path and labels_path(path) == str(tmp_path / "p.labels.npy")
    with pytest.raises(ValueError, match="must match and fit"):
        PairWriter(str(tmp_path / "q.npy"), 2, (4, 4, 1), False).write(1, x0[:2], eps[:2])


def test_bad_pairs_files_are_errors_naming_the_file_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no pairs file .*python -m diffusion.reflow"):
        make_source(f"pairs:{tmp_path / 'none.npy'}")
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((3, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match=r"flat.npy holds float32 \(3, 4, 4, 1\), not float"):
        make_source(f"pairs:{flat}")
    x0, eps = _pairs()
    path = str(tmp_path / "cut.npy")
    write_pairs(path, x0, eps)
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="cut.npy is truncated or corrupt"):
        make_source(f"pairs:{path}")
    write_pairs(path, x0, eps)
    with pytest.raises(ValueError, match="cannot be resized"):
        make_source(f"pairs:{path}").get([0], image_size=(8, 8))


# ---- reflow straightens a Gaussian's flow ------------------------------------------------

class _MLP(nn.Module):
    """A velocity network for 2-D points with the denoisers' call signature."""

    @nn.compact
    def __call__(self, x, c_noise, y=None, train=False):
        t = (c_noise[:, None] + 1.0) / 1000.0
        h = jnp.concatenate([x, t, jnp.sin(3 * t), jnp.cos(3 * t)], axis=-1)
        for _ in range(2):
            h = nn.silu(nn.Dense(64)(h))
        return nn.Dense(2)(h)


def _train(x0, eps, coupled, steps=250):
    model = _MLP()
    tx = optax.adam(3e-3)
    state = init_state(model, tx, jax.random.key(0), image_shape=(2,), num_classes=0)
    step = jax.jit(make_flow_train_step(
        model, FLOW, tx, lambda s: 3e-3, loss_kwargs=dict(time_sampling="uniform"),
        coupled=coupled, num_classes=0, label_dropout=0.0, ema_rate=0.0, ema_warmup=False))
    n, b = len(x0), 256
    tail = []
    for k in range(steps):
        i = (np.arange(b) + k * b) % n
        batch = dict(image=x0[i], label=jnp.zeros(b, jnp.int32))
        if coupled:
            batch["noise"] = eps[i]
        state, metrics = step(state, batch)
        if k >= steps - 100:
            tail.append(float(metrics["loss"]))
    return model, state.params, float(np.mean(tail))


def test_reflow_on_straight_couplings_goes_below_any_independent_coupling_loss():
    g = make_problem("gaussian2d").gmm
    n = 8192
    eps = jax.random.normal(jax.random.key(1), (n, 2))
    x0_straight = exact_path_flow_map(g, FLOW, 1.0, 0.0)(eps)  # the 1-RF ODE map
    x0_data, _ = gmm_sample(g, jax.random.key(2), n)
    # Independent couplings: no model gets below the loss of the exact velocity E[u|x_t].
    floor = float(jnp.mean(fm.flow_matching_loss(
        lambda x, c: exact_velocity(g, FLOW, x, FLOW.t_from_c_noise(c)), FLOW, x0_data,
        jax.random.key(3), time_sampling="uniform")[0]))
    assert floor > 0.05
    _, _, loss_indep = _train(x0_data, None, coupled=False)
    model, params, loss_reflow = _train(x0_straight, eps, coupled=True)
    assert loss_indep > 0.8 * floor
    assert loss_reflow < 0.2 * floor, (loss_reflow, floor)
    # One Euler step from t = 1: the reflowed model lands near the exact ODE's x0; the
    # exact 1-rectified flow's single step gives E[x0] (the mean) for every start.
    test_eps = jax.random.normal(jax.random.key(4), (2048, 2))
    target = exact_path_flow_map(g, FLOW, 1.0, 0.0)(test_eps)
    c1 = FLOW.c_noise(jnp.ones(2048))
    one_step = test_eps - model.apply({"params": params}, test_eps, c1)
    one_step_exact = test_eps - exact_velocity(g, FLOW, test_eps, 1.0)
    err = float(jnp.sqrt(jnp.mean(jnp.sum((one_step - target) ** 2, -1))))
    err_exact = float(jnp.sqrt(jnp.mean(jnp.sum((one_step_exact - target) ** 2, -1))))
    assert err < 0.4 * err_exact, (err, err_exact)


def test_reflow_step_without_noise_in_the_batch_names_the_pairs_source():
    model = _MLP()
    tx = optax.adam(1e-3)
    state = init_state(model, tx, jax.random.key(0), image_shape=(2,), num_classes=0)
    step = make_flow_train_step(model, FLOW, tx, lambda s: 1e-3, loss_kwargs={},
                                coupled=True, num_classes=0, label_dropout=0.0,
                                ema_rate=0.0, ema_warmup=False)
    with pytest.raises(ValueError, match="data.source to pairs:FILE.npy"):
        step(state, dict(image=jnp.zeros((4, 2)), label=jnp.zeros(4, jnp.int32)))
