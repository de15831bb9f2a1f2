"""Test setup: 8 fake CPU devices (set before JAX is imported) so that sharded code is
tested anywhere, the repository root on sys.path, and a persistent compilation cache
shared with the subprocesses the tests start (compile time dominates CPU tests)."""
import gc
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
# One BLAS / OpenMP thread per process (read when numpy and torch load, so here, before
# either is imported): the two xdist workers already fill the two cores, and idle
# OpenBLAS threads spin (1-3 % of the CPU time in `perf` profiles of the test processes).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Python's cyclic GC ran every 700 allocations and took ~5-8 % of a test process's CPU
# time (`perf`: gc_collect_main, visit_decref, visit_reachable), walking JAX's traced
# programs while they are alive. A larger young generation lets most of them die first.
# Measured with the BLAS setting above, side by side on two sets of three test files:
# 6 % and 8 % less CPU time.
gc.set_threshold(50_000, 20, 100)
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


# The test files by their measured time, longest first (--durations=0 on 2 cores,
# 2026-12-03). `--dist loadfile` hands files to the workers in collection order, and
# xdist by default orders them by their number of tests: the long single-test files
# (test_multihost, 30-40 s) came last, and one worker idled while the other ran them.
# Longest first, the last files handed out are short ones. A file not listed runs after
# these, in the usual order.
LONGEST_FILES = (
    "test_text_conditioning.py", "test_stable_diffusion.py", "test_train.py",
    "test_multihost.py", "test_analytic.py", "test_consistency.py", "test_reliability.py",
    "test_vae_train.py", "test_diffusers_parity.py", "test_pretrained.py",
    "test_flow_matching.py", "test_dit.py", "test_samplers.py", "test_context.py",
    "test_evaluation.py", "test_flow_samplers.py", "test_inpainting.py", "test_guidance.py",
    "test_unet.py", "test_vae.py", "test_unet_sd.py", "test_configs.py", "test_fsdp.py",
    "test_profiling.py", "test_throughput_smoke.py", "test_reflow.py",
    "test_flow_vs_diffusion_report.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's, on by default
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
