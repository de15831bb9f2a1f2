"""Reliability: bad config values fail first, NaNs never reach a checkpoint, a full disk
stops the run, a corrupt checkpoint falls back, a second launch is refused, crafted
weight files give clear errors, and the logs stay consistent across a resume."""
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import zipfile

import jax
import ml_collections
import numpy as np
import pytest

from configs.default import get_config
from diffusion.train import loop
from diffusion.train.setup import build_run
from diffusion.config_file import ConfigError

from subprocess_env import with_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- config validation

@pytest.mark.parametrize("key,value,match", [
    ("train.log_every", 0, "train.log_every"),
    ("train.checkpoint_every", 0, "train.checkpoint_every"),
    ("train.num_steps", 0, "train.num_steps"),
    ("data.global_batch_size", 0, "data.global_batch_size"),
    ("data.global_batch_size", 12, "data.global_batch_size"),  # 8 devices
    ("optim.lr", -1.0, "optim.lr"),
    ("data.image_size", 6, "attn_resolutions"),  # 6 -> level 6: attention at 8 vanishes
    ("train.fsdp", True, "optim.flatten"),  # runlocal's one optimizer vector
])
def test_bad_config_fails_before_anything_is_built(tmp_path, key, value, match):
    cfg = get_config("runlocal")
    section, leaf = key.split(".")
    cfg[section][leaf] = value
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        build_run(cfg, str(tmp_path))
    assert time.perf_counter() - t0 < 5
    assert not os.path.exists(tmp_path / "checkpoints")


# ----------------------------------------------------------------- crafted weight files

def _long(x: int) -> bytes:
    """A pickle LONG1 opcode for any int (negative and huge ones too)."""
    raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _text(s: str) -> bytes:
    return b"X" + len(s).to_bytes(4, "little") + s.encode()


def _crafted_pt(path, numel: int, offset: int, size: tuple, stride: tuple) -> None:
    """A torch zip checkpoint {'w': tensor} written by hand, header values as given:
    the pickle torch.save writes, without torch."""
    ints = lambda xs: b"(" + b"".join(_long(x) for x in xs) + b"t"
    pkl = (b"\x80\x02}" + _text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
           + b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu")
           + _long(numel) + b"tQ"
           + _long(offset) + ints(size) + ints(stride) + b"\x89"
           + b"ccollections\nOrderedDict\n)R" + b"tRs.")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes())


def test_crafted_torch_file_headers_are_bounds_checked(tmp_path):
    from diffusion.convert.dit_official import load_torch_file
    good = str(tmp_path / "good.pt")
    _crafted_pt(good, 6, 1, (2, 2), (2, 1))
    np.testing.assert_array_equal(load_torch_file(good, key=None)["w"], [[1, 2], [3, 4]])
    for i, (offset, size, stride) in enumerate([
            (0, (1 << 16,), (1,)),          # oversized: 64k elements from a storage of 6
            (5, (4,), (1,)),                # offset pushes the end past the storage
            (0, (2, 2), (4, 2)),            # strides reach element 6 of 0..5
            (0, (1 << 40,), (0,)),          # stride 0: in bounds, but a terabyte to copy
            (-3, (2,), (1,)),               # negative offset
            (0, (2,), (-1,)),               # negative stride
            (0, (2, 2), (1,))]):            # rank mismatch
        bad = str(tmp_path / f"bad{i}.pt")
        _crafted_pt(bad, 6, offset, size, stride)
        with pytest.raises((ValueError, pickle.UnpicklingError), match="malformed"):
            load_torch_file(bad, key=None)


def test_crafted_safetensors_header_is_bounds_checked(tmp_path):
    from diffusion.convert.torch_files import load_safetensors

    def write(name, header, data=b"\0" * 16):
        h = json.dumps(header).encode()
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h + data)
        return path

    ok = write("ok.safetensors", {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    assert load_safetensors(ok)["w"].shape == (2, 2)
    for i, info in enumerate([
            {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 16]},
            {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}]):
        with pytest.raises(ValueError, match="malformed"):
            load_safetensors(write(f"bad{i}.safetensors", {"w": info}))
    path = str(tmp_path / "huge_header.safetensors")
    with open(path, "wb") as f:
        f.write((1 << 60).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="malformed"):
        load_safetensors(path)


def test_inception_converter_loads_weights_only(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from diffusion.evaluation import convert_inception
    calls, load = [], torch.load
    # Explicit, not torch's default: before torch 2.6 the default ran any pickled code.
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or load(*a, **k))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = str(tmp_path / "evil.pth")
    torch.save({"w": torch.zeros(2), "evil": Evil()}, path)
    with pytest.raises(Exception):
        convert_inception.convert(path, str(tmp_path / "out.npz"))
    assert not (tmp_path / "pwned").exists()
    assert calls and all(k.get("weights_only") is True for k in calls)


# ----------------------------------------------------------------- the training loop

def _tiny(**train):
    cfg = get_config("runlocal")
    cfg.train.sample_every = 0
    for k, v in train.items():
        cfg.train[k] = v
    return cfg


def _steps_on_disk(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d)
                  if s.isdigit() and os.path.exists(os.path.join(d, s, "commit_success.txt")))


def _params_finite(workdir, step):
    from diffusion.checkpointing import Checkpointer
    run = build_run(_tiny(), workdir)
    state, _ = run.checkpointer.restore(run.abstract_state, step)
    run.checkpointer.close()
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


NAN_FROM = 5  # the poisoned step: not a log step (log_every=100), between two saves


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A run whose parameters turn NaN at step 5, checkpointing every 2 steps and
    logging only every 100: (workdir, the error it stopped with)."""
    wd = str(tmp_path_factory.mktemp("nan") / "run")
    real = loop._step_fn

    def poisoned(run):
        step = real(run)

        def fn(state, batch):
            new, metrics = step(state, batch)
            poison = jax.numpy.where(new.step >= NAN_FROM, jax.numpy.nan, 1.0)
            return new.replace(params=jax.tree.map(lambda p: p * poison, new.params)), metrics
        return fn
    loop._step_fn = poisoned
    try:
        with pytest.raises(loop.NonFiniteLossError) as info:
            loop.train_and_evaluate(_tiny(num_steps=12, log_every=100, checkpoint_every=2),
                                    wd)
    finally:
        loop._step_fn = real
    return wd, info.value


@pytest.mark.parametrize("where", ["none", "small", "large", "bf16"])
def test_finite_check_finds_one_bad_value_in_any_leaf(where):
    """The state check joins small leaves into one vector and reduces large ones alone:
    a single NaN or inf is found in either kind, in bfloat16 too; integer leaves and
    typed keys are skipped."""
    import jax.numpy as jnp
    big = loop._FINITE_CHECK_JOIN_MAX + 5
    tree = {"small": np.ones((3, 4), np.float32), "large": np.ones((big,), np.float32),
            "half": jnp.ones((7,), jnp.bfloat16), "step": np.int32(3),
            "key": jax.random.key(0)}
    if where == "small":
        tree["small"][1, 2] = np.nan
    elif where == "large":
        tree["large"][-1] = -np.inf
    elif where == "bf16":
        tree["half"] = tree["half"].at[4].set(jnp.inf)
    assert bool(jax.jit(loop._all_finite)(tree)) == (where == "none")
    assert bool(jax.jit(lambda t: loop._all_finite(t, lambda s: False))(tree)) == \
        (where == "none")  # nothing joined: one reduction per leaf
    assert bool(loop._all_finite({}))


def test_finite_check_of_an_fsdp_state_gathers_no_leaf():
    """Joining leaves FSDP shards would all-gather them: the check joins only what the
    run keeps replicated, so it compiles without an all-gather on 8 devices."""
    from diffusion import parallel
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    tree = {"w": np.ones((64, 32), np.float32), "b": np.ones((32,), np.float32)}
    shard = parallel.fsdp_sharding(tree, mesh)
    assert shard["w"].spec != parallel.P()  # sharded; b stays replicated
    placed = jax.device_put(tree, shard)
    # The predicate the train loop builds for an FSDP run (it reads only these fields).
    run = types.SimpleNamespace(mesh=mesh, config=ml_collections.ConfigDict(
        {"train": {"fsdp": True}}))
    fsdp_replicated = loop._replicated_leaf(run)
    assert fsdp_replicated((32,)) and not fsdp_replicated((64, 32))
    hlo = jax.jit(lambda t: loop._all_finite(t, fsdp_replicated)).lower(placed).compile()
    assert "all-gather" not in hlo.as_text()
    placed["w"] = placed["w"].at[5, 7].set(np.nan)
    assert not bool(jax.jit(lambda t: loop._all_finite(t, fsdp_replicated))(placed))


def test_nan_between_logs_never_reaches_a_checkpoint(nan_run):
    wd, err = nan_run
    msg = str(err)
    assert f"after step {NAN_FROM}" in msg and "last good checkpoint is step 4" in msg, msg
    assert "optim.lr" in msg and "\n" not in msg
    assert _steps_on_disk(wd) == [2, 4]  # nothing saved from step 5 on, nothing rotated out
    assert _params_finite(wd, 4)
    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert all(r["step"] < NAN_FROM for r in rows)


def test_resume_after_nan_and_corrupt_newest_falls_back(nan_run, tmp_path, caplog):
    wd = str(tmp_path / "run")
    shutil.copytree(nan_run[0], wd)
    step_dir = os.path.join(wd, "checkpoints", "4", "state", "d")
    for name in os.listdir(step_dir):  # a truncated data file in the newest checkpoint
        with open(os.path.join(step_dir, name), "r+b") as f:
            f.truncate(3)
    metrics = loop.train_and_evaluate(_tiny(num_steps=4, log_every=2, checkpoint_every=2), wd)
    assert metrics["step"] == 4 and np.isfinite(metrics["loss"])
    assert os.path.isdir(os.path.join(wd, "checkpoints", "4.corrupt"))
    assert any("checkpoints/4 cannot be restored" in r.getMessage() for r in caplog.records)
    assert _steps_on_disk(wd) == [2, 4] and _params_finite(wd, 4)


def test_second_launch_on_a_workdir_is_refused(tmp_path):
    from diffusion.train.workdir_lock import WorkdirLock, WorkdirLocked
    wd = str(tmp_path / "run")
    with WorkdirLock(wd):  # the first run, still alive
        with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()} on host"):
            loop.train_and_evaluate(_tiny(), wd)
    assert not os.path.exists(os.path.join(wd, "checkpoints"))
    assert not os.path.exists(os.path.join(wd, "config.json"))


def test_building_a_run_on_an_empty_workdir_writes_nothing(tmp_path):
    """--mode sample on an empty workdir used to leave an empty checkpoints/ behind."""
    run = build_run(_tiny(), str(tmp_path / "empty"))
    assert run.checkpointer.latest_step() is None
    run.checkpointer.close()
    assert not os.path.exists(tmp_path / "empty")


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    import socket
    from diffusion.train.workdir_lock import WorkdirLock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    with WorkdirLock(str(tmp_path)) as lock:
        assert (tmp_path / ".lock").read_text().split()[1] == str(os.getpid())
    assert lock._fd is None


def test_log_write_failing_with_enospc_stops_the_run(tmp_path, monkeypatch):
    from tensorboardX import record_writer
    from diffusion.io_errors import WriteFailed
    real, calls = record_writer.RecordWriter.write, [0]

    def fill_up(self, data):
        calls[0] += 1
        if calls[0] > 12:  # the header and hparams fit; the first logged step does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", fill_up)
    t0 = time.perf_counter()
    with pytest.raises(WriteFailed, match=r"events\.out\.tfevents.*No space left.*MB free"):
        loop.train_and_evaluate(_tiny(num_steps=50, log_every=1, checkpoint_every=1000),
                                str(tmp_path))
    assert time.perf_counter() - t0 < 120


def _launch(workdir, *overrides):
    cmd = [sys.executable, "launch.py", "--config=configs/default.py:runlocal",
           f"--workdir={workdir}", *overrides]
    # One device: compiling for conftest's eight takes minutes on a loaded 2-core box.
    env = with_devices(1)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_launch_reports_bad_config_in_one_line_with_its_status(tmp_path):
    proc = _launch(str(tmp_path / "run"), "--config.train.log_every=0")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ConfigError: train.log_every must be a positive integer")
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


def test_full_disk_stops_the_run_naming_the_path(tmp_path):
    """A real 1 MB tmpfs workdir when mounting is permitted (root, not in every container):
    a checkpoint does not fit (with the tiny run's flat optimizer the first one may)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=1m tmpfs {mnt} 2>/dev/null"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        t0 = time.perf_counter()
        proc = _launch(str(mnt / "run"), "--config.train.num_steps=100000",
                       "--config.train.sample_every=0", "--config.train.checkpoint_every=2")
        assert proc.returncode == 4, proc.stderr[-6000:]
        # The error line. Orbax's background threads may print "Event loop is closed"
        # tracebacks while the interpreter shuts down (1 run in 6), even in the middle of
        # that line: it is found wherever it starts.
        lines = re.findall(r"WriteFailed: .*", proc.stderr)
        assert len(lines) == 1, proc.stderr[-6000:]
        assert lines[0].startswith("WriteFailed: writing") and "No space left" in lines[0]
        assert "MB free" in lines[0]
        assert str(mnt / "run") in lines[0]
        assert time.perf_counter() - t0 < 600
    finally:
        os.system(f"umount {mnt}")


def test_sample_mode_falls_back_past_a_corrupt_newest_checkpoint(nan_run, tmp_path,
                                                                  monkeypatch):
    from diffusion.train.generate import sample_from_workdir

    def no_data(*args, **kwargs):  # sample mode loads the run (diffusion.load), no dataset
        raise AssertionError("sample mode must not build the data source")
    monkeypatch.setattr("diffusion.data.registry.make_source", no_data)
    monkeypatch.setattr("diffusion.train.setup.make_source", no_data)
    wd = str(tmp_path / "run")
    shutil.copytree(nan_run[0], wd)
    step_dir = os.path.join(wd, "checkpoints", "4", "state", "d")
    for name in os.listdir(step_dir):
        with open(os.path.join(step_dir, name), "r+b") as f:
            f.truncate(3)
    cfg = _tiny()
    cfg.sample.update(num_samples=2, num_steps=2)
    path = sample_from_workdir(cfg, wd, overrides=[])
    assert path.endswith("_step2.npz") and os.path.exists(path)
    # Sampling reads a run; it never moves its checkpoints.
    assert os.path.isdir(os.path.join(wd, "checkpoints", "4"))
