"""Two processes on localhost (CPU, gloo collectives): one 2-process run (they are slow
to start) checks that they train like one process, write shared checkpoints, and stop
together when only one of them gets SIGTERM."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from diffusion.config_file import read_run_config
from diffusion.train import loop

from subprocess_env import with_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A constant learning rate after warm-up, so that the first steps do not depend on
# num_steps: the 2-process run is open-ended (stopped by SIGTERM), the reference is not.
COMMON = {"train.sample_every": 0, "train.log_every": 1, "train.checkpoint_every": 2,
          "optim.decay": "constant"}


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _rows(path):
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_two_processes_match_one_and_stop_together_on_sigterm(tmp_path, tiny_default_run):
    # The one-process reference: the shared tiny run (tests/conftest.py), which trains
    # configs/default.py:runlocal with COMMON's settings but for its log_every.
    cfg = read_run_config(tiny_default_run)
    assert all(cfg[k.split(".")[0]][k.split(".")[1]] == v
               for k, v in COMMON.items() if k != "train.log_every")
    single = _rows(os.path.join(tiny_default_run, "metrics.jsonl"))[4]

    port = _free_port()
    env = with_devices(2)
    wd = str(tmp_path / "multi")
    procs = [subprocess.Popen(
        [sys.executable, "launch.py", "--config=configs/default.py:runlocal", f"--workdir={wd}",
         *[f"--config.{k}={v}" for k, v in COMMON.items()], "--config.train.num_steps=100000",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    metrics = os.path.join(wd, "metrics.jsonl")
    t0 = time.time()
    while not (os.path.exists(metrics) and max(_rows(metrics), default=0) >= 5):
        assert all(p.poll() is None for p in procs), procs[0].stdout.read()
        assert time.time() - t0 < 400, "timed out"
        time.sleep(0.2)
    # Each process has its own SIGTERM flag: they agree at the next log step, so both save
    # the same step and exit with EXIT_PREEMPTED instead of one waiting forever.
    procs[1].send_signal(signal.SIGTERM)  # only the second host is told
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [loop.EXIT_PREEMPTED] * 2, outs
    stops = [int(o.split("preempted (SIGTERM) at step ")[1].split(":")[0]) for o in outs]
    assert stops[0] == stops[1] >= 5

    assert _rows(metrics)[4]["loss"] == pytest.approx(single["loss"], rel=1e-5)
    on_disk = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
    assert on_disk[-1] == stops[0] and len(on_disk) >= 2
    assert all(s % 2 == 0 for s in on_disk[:-1])  # the periodic saves of both processes

