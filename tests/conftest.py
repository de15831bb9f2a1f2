"""Test setup: 8 fake CPU devices (set before JAX is imported) so that sharded code is
tested anywhere, the repository root on sys.path, and a persistent compilation cache
shared with the subprocesses the tests start (compile time dominates CPU tests)."""
import os
import sys
import tempfile

# XLA's newer MLIR fusion emitters cost twice the compile time of its classic emitters
# for these tiny programs (measured: 98 s -> 64 s for tests/test_analytic.py, which is
# all compiling); no test checks a property of the generated code.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_use_fusion_emitters=false "
                      "--xla_cpu_parallel_codegen_split_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "diffusion-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA's CPU optimisation passes cost more compile time than these tiny programs save in run
# time (measured: 35 % less CPU time for the compile-heavy test files). No test checks a
# property of XLA's optimisations; the subprocesses (launch.py) inherit the setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import shutil  # noqa: E402  (after the environment above, like everything that may import JAX)

import filelock  # noqa: E402
import pytest  # noqa: E402


def _shared_root(tmp_path_factory, worker_id):
    """A folder all xdist workers of this session share (one test session's own)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def tiny_default_run(tmp_path_factory, worker_id):
    """configs/default.py:runlocal trained once per test session (4 steps, checkpoints at
    2 and 4, no sample grids), shared by every test file and worker. Read-only: a test
    that changes a workdir copies this one first."""
    root = _shared_root(tmp_path_factory, worker_id) / "shared_runs"
    root.mkdir(exist_ok=True)
    wd = root / "default_runlocal"
    with filelock.FileLock(str(root / "default_runlocal.lock")):
        if not (root / "default_runlocal.done").exists():
            from configs.default import get_config
            from diffusion.train import loop
            shutil.rmtree(wd, ignore_errors=True)
            cfg = get_config("runlocal")
            cfg.train.sample_every = 0
            loop.train_and_evaluate(cfg, str(wd))
            (root / "default_runlocal.done").touch()
    return str(wd)
