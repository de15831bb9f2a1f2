"""Test setup: 8 fake CPU devices (set before JAX is imported) so that sharded code is
tested anywhere, the repository root on sys.path, and a persistent compilation cache
shared with the subprocesses the tests start (compile time dominates CPU tests)."""
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
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

