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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


import jax  # noqa: E402  (after the environment above is set)
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compile():
    """Halves XLA's CPU compile time for a module whose checks do not depend on XLA's
    optimisations: `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
    old = jax.config.values.get("jax_disable_most_optimizations", False)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
