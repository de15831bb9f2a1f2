"""The train step and loop: 8 devices equal 1, resume equals an uninterrupted run,
SIGTERM saves, SIGKILL resumes, bad config and bad shapes fail before compiling."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.default import get_config
from diffusion.config_file import read_run_config
from diffusion.train import loop
from diffusion.train.generate import sample_from_workdir
from diffusion.train.setup import build_run

from train_steps import train_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(devices, workdir, n=3, flatten=True):
    cfg = get_config("runlocal")
    cfg.optim.flatten = flatten
    run = build_run(cfg, workdir, devices)
    state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(0))
    moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    num_params = len(jax.tree.leaves(state.params))
    assert len(moments) == (2 if flatten else 2 * num_params), len(moments)  # Adam's mu, nu
    losses, state = train_steps(run, state, n)
    return losses, jax.device_get(state.params), jax.device_get(state.ema_params)


def test_eight_devices_equal_one(tmp_path):
    """Also the flat optimizer (optim.flatten, the tiny configs' setting: AdamW, the
    clip, the EMA on one vector) against the per-array one that full configs use."""
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    l1, p1, e1 = _steps(jax.devices()[:1], str(tmp_path / "one"), flatten=False)
    l8, p8, e8 = _steps(jax.devices(), str(tmp_path / "eight"), flatten=True)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p8, p1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), e8, e1)
    assert l1[0] != l1[1], "successive steps should see different batches and noise"


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_matches_uninterrupted_run(tmp_path, tiny_default_run):
    full = tiny_default_run  # trained uninterrupted (tests/conftest.py)
    cfg = read_run_config(full)  # the config it was trained with
    steps = sorted(int(d) for d in os.listdir(os.path.join(full, "checkpoints")) if d.isdigit())
    assert steps == [2, 4]
    for name in ("config.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(full, name))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(full))
    # Simulate a crash after step 2: the workdir as it was then, and relaunch.
    cut = str(tmp_path / "cut")
    shutil.copytree(full, cut)
    shutil.rmtree(os.path.join(cut, "checkpoints", "4"))
    os.remove(os.path.join(cut, "metrics.jsonl"))
    resumed = loop.train_and_evaluate(cfg, cut)
    expected = {r["step"]: r["loss"] for r in _read_jsonl(os.path.join(full, "metrics.jsonl"))}
    assert resumed["step"] == 4
    assert resumed["loss"] == pytest.approx(expected[4], rel=1e-6)


def test_model_that_cannot_take_the_image_shape_fails_before_compiling(tmp_path):
    cfg = get_config("runlocal")
    cfg.data.image_size = 6
    cfg.model.unet.ch_mult = (1, 2, 2)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="6"):
        build_run(cfg, str(tmp_path))
    assert time.perf_counter() - t0 < 20


def _launch(workdir, *overrides, config="configs/default.py:runlocal", mode="train"):
    cmd = [sys.executable, "launch.py", f"--config={config}", f"--workdir={workdir}",
           f"--mode={mode}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_typo_in_override_is_an_error_naming_the_key(tmp_path):
    proc = _launch(str(tmp_path), "--config.optim.lrr=1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "lrr" in out
    proc = _launch(str(tmp_path), "--config.optim.lr=fast")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "lr" in out


def _checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(s) for s in os.listdir(d)
                  if s.isdigit() and os.path.exists(os.path.join(d, s, "commit_success.txt")))


def _wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_sigkill_resumes_then_sigterm_saves_then_sample(tmp_path):
    """Two launches of one workdir: killed hard, it resumes from its last periodic
    checkpoint; told to stop (SIGTERM), it saves where it is; sample mode reads that."""
    wd = str(tmp_path / "run")
    endless = ["--config.train.num_steps=100000", "--config.train.sample_every=0",
               "--config.train.log_every=1"]
    proc = _launch(wd, *endless, "--config.train.checkpoint_every=2")
    _wait_for(lambda: _checkpoints(wd) and _checkpoints(wd)[-1] >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    last = _checkpoints(wd)[-1]

    metrics = os.path.join(wd, "metrics.jsonl")
    logged = max(r["step"] for r in _read_jsonl(metrics))  # maybe past `last`
    proc = _launch(wd, *endless, "--config.train.checkpoint_every=1000")
    _wait_for(lambda: max(r["step"] for r in _read_jsonl(metrics)) > logged, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert f"resumed from checkpoint at step {last}" in out, out
    assert proc.returncode == loop.EXIT_PREEMPTED, out  # preempted, checkpoint saved
    assert "relaunch the same command to resume" in out
    saved = _checkpoints(wd)[-1]
    assert saved > logged, (saved, logged, out)  # a save of its own, not a periodic one

    # Sample mode reads that save: launch.py --mode sample's function, called here (a
    # third launch paid its own start-up, ~5 s of imports; launch.py's sample branch and
    # its overrides are launched by test_run_config's contradicting-override test).
    cfg = get_config("runlocal")
    cfg.sample.num_samples = 5
    path = sample_from_workdir(cfg, wd, overrides=["sample.num_samples"])
    npz = [f for f in os.listdir(wd) if f.endswith(".npz")]
    assert npz == [f"samples_ddim_4steps_step{saved}.npz"], npz  # the SIGTERM checkpoint
    assert path == os.path.join(wd, npz[0])
    data = np.load(os.path.join(wd, npz[0]))  # ADM's layout: arr_0 (+ arr_1 if conditional)
    assert data.files == ["arr_0"]
    assert data["arr_0"].shape == (5, 8, 8, 3) and data["arr_0"].dtype == np.uint8
    assert os.path.exists(os.path.join(wd, npz[0][:-4] + ".png"))


def test_periodic_evaluation_writes_sample_quality(tmp_path):
    cfg = get_config("runlocal")
    cfg.train.sample_every = 0
    cfg.train.eval_every = 4
    cfg.eval.num_samples = 16
    loop.train_and_evaluate(cfg, str(tmp_path))
    rows = _read_jsonl(os.path.join(str(tmp_path), "metrics.jsonl"))
    evals = [r for r in rows if "eval/fid_classifier@16" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4
    assert np.isfinite(evals[0]["eval/fid_classifier@16"]) and evals[0]["eval/num_samples"] == 16
    assert any(f.startswith("ref_stats_classifier_test_8x8") for f in os.listdir(tmp_path))
