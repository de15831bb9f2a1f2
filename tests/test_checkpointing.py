"""Tests for diffusion.checkpointing: round trips, keep-last-K, half-written steps, meshes."""
import os
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion import checkpointing
from diffusion.checkpointing import Checkpointer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    ema_params: dict
    rng: jax.Array


def _optimizer():
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, 100)
    return optax.adamw(schedule, weight_decay=0.01)


def _make_state(step: int, n_dev: int) -> TrainState:
    """A state one optimizer update in, so counts and moments are non-trivial."""
    k = jax.random.key(step)
    params = {"w": jax.random.normal(k, (2 * n_dev, 3)), "b": jnp.arange(3.0)}
    opt = _optimizer()
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    ema = jax.tree.map(lambda p: 0.5 * p, params)
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      opt_state=opt_state, ema_params=ema,
                      rng=jax.random.split(jax.random.key(100 + step))[1])


def _mesh():
    devices = jax.devices()
    return jax.make_mesh((len(devices),), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))


def _shardings(state, mesh):
    """Everything replicated except params['w'], sharded along 'data'."""
    rep = NamedSharding(mesh, P())
    sh = jax.tree.map(lambda _: rep, state)
    return sh.replace(params={"w": NamedSharding(mesh, P("data")), "b": rep})


def _abstract(state, shardings):
    shapes = jax.eval_shape(lambda: state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if checkpointing._is_key(x):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_orbax_names_match():
    assert checkpointing.TMP_DIR_SUFFIX == ocp.path.atomicity_types.TMP_DIR_SUFFIX
    assert checkpointing.COMMIT_FILE == ocp.path.atomicity_types.COMMIT_SUCCESS_FILE


def test_roundtrip_state_typed_key_opt_state_and_extra(tmp_path):
    n_dev = len(jax.devices())
    mesh = _mesh()
    state = _make_state(7, n_dev)
    shardings = _shardings(state, mesh)
    state = jax.device_put(state, shardings)
    extra = {"data": {"epoch": 1, "index": 1234}, "config": {"lr": 1e-3, "mults": [1, 2]}}

    ckpt = Checkpointer(str(tmp_path))
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, extra)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    assert (tmp_path / "7" / checkpointing.COMMIT_FILE).exists()
    ckpt.close()

    # A fresh instance, as a resumed job would build it.
    abstract = _abstract(state, shardings)
    with Checkpointer(str(tmp_path)) as ckpt2:
        assert ckpt2.latest_step() == 7
        restored, extra2 = ckpt2.restore(abstract)
    assert extra2 == extra
    _assert_same(restored, state)
    assert isinstance(restored, TrainState)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert type(restored.opt_state[0]) is type(state.opt_state[0])
    # Restored arrays land on the target shardings, across all devices.
    for x, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(sh, x.ndim), (x.sharding, sh)
    w = restored.params["w"]
    assert len(w.addressable_shards) == n_dev
    assert w.addressable_shards[0].data.shape == (2, 3)
    # The restored optimizer state and key still work.
    opt = _optimizer()
    grads = jax.tree.map(jnp.ones_like, restored.params)
    opt.update(grads, restored.opt_state, restored.params)
    jax.random.normal(restored.rng, (2,))


def test_restore_reshards_and_keeps_key_impl(tmp_path):
    """Saved from one device, restored onto the mesh; a non-default key impl survives."""
    n_dev = len(jax.devices())
    state = {"w": jnp.arange(4.0 * n_dev).reshape(2 * n_dev, 2),
             "keys": jax.random.split(jax.random.key(3, impl="rbg"), n_dev)}
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state)
    mesh = _mesh()
    sh = {"w": NamedSharding(mesh, P("data")), "keys": NamedSharding(mesh, P("data"))}
    restored, extra = Checkpointer(str(tmp_path)).restore(_abstract(state, sh))
    assert extra == {}
    _assert_same(restored, state)
    assert jax.random.key_impl(restored["keys"]) == jax.random.key_impl(state["keys"])
    assert len(restored["keys"].addressable_shards) == n_dev
    assert restored["w"].sharding.is_equivalent_to(sh["w"], 2)


def test_keep_last_k_and_skip_rules(tmp_path):
    state = {"x": jnp.zeros(3)}
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3, 4):
        assert ckpt.save(step, {"x": jnp.full(3, float(step))}, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    assert not ckpt.save(4, state)  # already saved
    assert not ckpt.save(2, state)  # older than the latest
    sh = {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    restored, extra = ckpt.restore(_abstract(state, sh), step=3)
    np.testing.assert_array_equal(restored["x"], 3.0)
    assert extra == {"step": 3}
    with pytest.raises(FileNotFoundError, match="step 1"):
        ckpt.restore(_abstract(state, sh), step=1)
    ckpt.close()


def test_half_written_checkpoints_are_ignored(tmp_path):
    sh = {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    abstract = _abstract({"x": jnp.zeros(4)}, sh)
    with Checkpointer(str(tmp_path), max_to_keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"x": jnp.full(4, float(step))}, {"step": step})

    # What a crash leaves behind: (a) orbax's tmp dir for step 3, never renamed;
    # (b) a step-4 directory without its commit file, one of its files truncated
    # (the commit-file mode's half-written state; orbax alone lists such a step).
    good = tmp_path / "2"
    shutil.copytree(good, tmp_path / ("3" + checkpointing.TMP_DIR_SUFFIX))
    os.remove(tmp_path / ("3" + checkpointing.TMP_DIR_SUFFIX) / checkpointing.COMMIT_FILE)
    shutil.copytree(good, tmp_path / "4")
    os.remove(tmp_path / "4" / checkpointing.COMMIT_FILE)
    files = sorted(p for p in (tmp_path / "4").rglob("*") if p.is_file())
    with open(files[-1], "r+b") as f:
        f.truncate(1)

    ckpt = Checkpointer(str(tmp_path), max_to_keep=3)
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [1, 2]
    restored, extra = ckpt.restore(abstract)
    assert extra == {"step": 2}
    np.testing.assert_array_equal(restored["x"], 2.0)
    with pytest.raises(FileNotFoundError):
        ckpt.restore(abstract, step=4)

    # Resuming from 2 writes 3 and 4 again: the debris must not block that.
    assert ckpt.save(3, {"x": jnp.full(4, 3.0)}, {"step": 3})
    assert ckpt.save(4, {"x": jnp.full(4, 4.0)}, {"step": 4})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3, 4]
    names = {p.name for p in tmp_path.iterdir()}
    assert "4" + checkpointing.INCOMPLETE_SUFFIX in names  # moved aside, not deleted
    assert not any(checkpointing.TMP_DIR_SUFFIX in n for n in names)
    restored, extra = ckpt.restore(abstract)
    assert extra == {"step": 4}
    np.testing.assert_array_equal(restored["x"], 4.0)
    ckpt.close()


def test_clear_errors(tmp_path):
    ckpt = Checkpointer(str(tmp_path))
    sh = {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    abstract = _abstract({"x": jnp.zeros(2)}, sh)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        ckpt.restore(abstract)
    with pytest.raises(ValueError, match="JSON"):
        ckpt.save(1, {"x": jnp.zeros(2)}, {"bad": object()})
    ckpt.save(1, {"x": jnp.zeros(2)})
    ckpt.wait()
    with pytest.raises(ValueError, match=r"\['x'\] has no sharding"):
        ckpt.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(str(tmp_path / "other"), max_to_keep=0)
    ckpt.close()


def _truncate_data(step_dir):
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(3)


@pytest.mark.parametrize("damage", ["truncated_data", "missing_manifest", "truncated_extra"])
def test_corrupt_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path, damage):
    sh = {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    abstract = _abstract({"x": jnp.zeros(4)}, sh)
    with Checkpointer(str(tmp_path)) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"x": jnp.full(4, float(step))}, {"step": step})
    newest = tmp_path / "3"
    if damage == "truncated_data":
        _truncate_data(newest)
    elif damage == "missing_manifest":
        os.remove(newest / "state" / "manifest.ocdbt")
    else:
        with open(newest / "extra" / "metadata", "r+b") as f:
            f.truncate(3)
    ckpt = Checkpointer(str(tmp_path))
    step, restored, extra = ckpt.restore_latest(abstract, move_aside=True)
    assert (step, extra) == (2, {"step": 2})
    np.testing.assert_array_equal(restored["x"], 2.0)
    assert (tmp_path / ("3" + checkpointing.CORRUPT_SUFFIX)).is_dir()  # kept, not deleted
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.save(3, {"x": jnp.full(4, 30.0)}, {"step": 3})  # the number is free again
    ckpt.wait()
    assert ckpt.restore_latest(abstract)[0] == 3
    ckpt.close()


def test_restore_latest_moves_nothing_when_no_step_restores(tmp_path):
    sh = {"x": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    with Checkpointer(str(tmp_path)) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"x": jnp.full(4, float(step))})
    ckpt = Checkpointer(str(tmp_path))

    def reject(state):
        raise ValueError("not finite")
    with pytest.raises(checkpointing.CheckpointError, match=f"{tmp_path}/2.*not finite"):
        ckpt.restore_latest(_abstract({"x": jnp.zeros(4)}, sh), verify=reject, move_aside=True)
    assert ckpt.all_steps() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    ckpt.close()


def test_a_reader_creates_nothing(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.latest_step() is None
    ckpt.close()
    assert not (tmp_path / "checkpoints").exists()


def test_failed_background_save_is_reported_naming_the_step(tmp_path, monkeypatch):
    from diffusion.io_errors import WriteFailed
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, {"x": jnp.zeros(2)})
    ckpt.wait()
    ckpt.check()  # nothing in flight: returns

    def failed():
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "x/0": Failed to write 455039 '
                         "bytes to file 4: No space left on device [os_error_code='28']")
    monkeypatch.setattr(ckpt._manager, "wait_until_finished", failed)
    monkeypatch.setattr(ckpt._manager, "is_saving_in_progress", lambda: False)
    ckpt._in_flight = 5  # as if save(5) had started and then failed in the background
    with pytest.raises(WriteFailed, match=rf"{tmp_path}/5 failed: No space left.*MB free"):
        ckpt.check()
    monkeypatch.undo()
    ckpt.close()


def test_full_disk_checkpoint_fails_with_a_clear_error(tmp_path):
    """A real 1 MB tmpfs when mounting is permitted (root, not in every container)."""
    from diffusion.io_errors import WriteFailed
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=1m tmpfs {mnt} 2>/dev/null"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        ckpt = Checkpointer(str(mnt / "checkpoints"))
        big = {"x": jax.random.normal(jax.random.key(0), (400_000,))}  # 1.6 MB
        ckpt.save(1, big)
        with pytest.raises(WriteFailed, match="checkpoints/1 failed: No space left"):
            ckpt.wait()
        ckpt.close()
        assert ckpt.all_steps() == []
    finally:
        os.system(f"umount {mnt}")


def test_one_process_writes_each_array_once_and_reads_replica_parallel_saves(tmp_path):
    """Orbax's CPU default cuts every replicated array into one slice per device (a device
    op and a host copy each) so that hosts can share a write; with one process the
    Checkpointer turns that off, and checkpoints written the old way still restore."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    mesh = _mesh()
    rep = NamedSharding(mesh, P())
    state = {"w": jax.device_put(jnp.arange(24.0).reshape(8, 3), rep),
             "b": jax.device_put(jnp.ones(5), rep)}
    old = ocp.type_handlers.ArrayHandler(use_replica_parallel=True)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, old, override=True)
        # The manager that saves must be the one waited on: its save is asynchronous
        # (waiting on a second manager raced it, a flaky "no finished checkpoint").
        mgr = ocp.CheckpointManager(str(tmp_path / "old"), item_names=("state", "extra"))
        mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            extra=ocp.args.JsonSave({"a": 1})))
        mgr.wait_until_finished()
        mgr.close()
        ckpt = Checkpointer(str(tmp_path / "new"))
        assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
        with ckpt:
            ckpt.save(1, state)
        sh = jax.tree.map(lambda _: rep, state)
        for d in ("old", "new"):
            restored, _ = Checkpointer(str(tmp_path / d)).restore(_abstract(state, sh))
            _assert_same(restored, state)
    finally:
        ocp.type_handlers.register_type_handler(jax.Array, default, override=True)
