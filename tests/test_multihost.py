"""Two processes on localhost (CPU, gloo collectives) train like one process."""
import json
import os
import socket
import subprocess
import sys

import pytest

from configs.default import get_config
from diffusion.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    cfg = get_config("runlocal")
    cfg.train.sample_every = 0
    single = loop.train_and_evaluate(cfg, str(tmp_path / "single"))

    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    wd = str(tmp_path / "multi")
    procs = [subprocess.Popen(
        [sys.executable, "launch.py", "--config=configs/default.py:runlocal", f"--workdir={wd}",
         "--config.train.sample_every=0", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    assert rows[4]["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()) == [2, 4]
