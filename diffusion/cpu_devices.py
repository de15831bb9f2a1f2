"""Use every core of a CPU-only machine: one XLA CPU device per core, batch split over them.

XLA's CPU backend runs one program of this codebase's small networks on about one
core (measured: 1.05 of 2 cores for the default U-Net). Splitting the host into N
devices with `--xla_force_host_platform_device_count=N` lets the train step, which
already shards its batch over a `data` mesh axis, run N programs in parallel; see the
"CPU speed (issue 12)" section of BENCHMARKS.md and experiments/cpu_devices/.

This module imports no JAX: the flag only works when set before JAX initialises, so
launch.py calls `configure` first thing. It leaves everything alone when

  * the user already chose a device count in XLA_FLAGS,
  * JAX_PLATFORMS names a non-CPU backend first (e.g. "cuda", "tpu"),
  * an accelerator is visible (/dev/nvidia0, /dev/accel0, /dev/vfio on TPU VMs) and
    JAX_PLATFORMS does not force "cpu",
  * JAX is already imported (too late; a warning says so).

`auto` uses the cores this process may run on, reduced to the largest count that
divides every batch the run splits over devices; an explicit N must divide them.
"""
from __future__ import annotations

import glob
import logging
import os
import sys
from typing import Iterable, Mapping

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_ACCELERATOR_PATHS = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0")

log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def accelerator_present() -> bool:
    """A cheap look for a GPU/TPU without importing JAX: its device files."""
    return any(os.path.exists(p) for p in _ACCELERATOR_PATHS) or bool(glob.glob("/dev/accel*"))


def largest_divisor(n: int, batch_sizes: Iterable[int]) -> int:
    """The largest d <= n dividing every batch size (1 if none is larger)."""
    sizes = [int(b) for b in batch_sizes if b]
    for d in range(max(1, n), 0, -1):
        if all(b % d == 0 for b in sizes):
            return d
    return 1


def skip_reason(env: Mapping[str, str] | None = None,
                accelerator: bool | None = None) -> str | None:
    """Why the device count must be left alone here, or None when it may be set."""
    env = os.environ if env is None else env
    if DEVICE_COUNT_FLAG in env.get("XLA_FLAGS", ""):
        return f"XLA_FLAGS already sets {DEVICE_COUNT_FLAG}"
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and platforms[0] != "cpu":
        return f"JAX_PLATFORMS={env['JAX_PLATFORMS']} selects a non-CPU backend"
    if not platforms and (accelerator_present() if accelerator is None else accelerator):
        return "an accelerator is present"
    return None


def resolve(spec: str, batch_sizes: Iterable[int] = (), *,
            env: Mapping[str, str] | None = None, accelerator: bool | None = None,
            cores: int | None = None) -> tuple[int | None, str]:
    """(device count to force or None, a one-line reason) for spec "auto" | "off" | "N"."""
    spec = str(spec).strip().lower()
    batch_sizes = [int(b) for b in batch_sizes if b]
    if spec in ("off", "none", ""):
        return None, "--cpu_devices=off"
    if spec != "auto":
        try:
            n = int(spec)
        except ValueError:
            raise ValueError(f"--cpu_devices must be auto, off or a positive integer, "
                             f"got {spec!r}") from None
        if n <= 0:
            raise ValueError(f"--cpu_devices must be positive, got {n}")
    reason = skip_reason(env, accelerator)
    if reason is not None:
        return None, f"CPU device count left alone: {reason}"
    if spec == "auto":
        cores = available_cores() if cores is None else cores
        n = largest_divisor(cores, batch_sizes)
        why = f"{cores} cores"
        if n != cores:
            why += f", reduced to {n} to divide the batch sizes {batch_sizes}"
        return n, f"{n} CPU devices ({why})"
    bad = [b for b in batch_sizes if b % n]
    if bad:
        raise ValueError(f"--cpu_devices={n} does not divide the batch sizes {bad}; "
                         f"choose a divisor (largest <= {n}: "
                         f"{largest_divisor(n, batch_sizes)}) or change the batch size")
    return n, f"{n} CPU devices (--cpu_devices={n})"


def configure(spec: str = "auto", batch_sizes: Iterable[int] = ()) -> int | None:
    """Sets XLA_FLAGS for `spec` before JAX starts; returns the count set, or None."""
    if "jax" in sys.modules:
        log.warning("cpu_devices: JAX is already imported; --cpu_devices=%s has no effect", spec)
        return None
    n, reason = resolve(spec, batch_sizes)
    if n is not None and n > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={n}".strip()
    log.info("cpu_devices: %s", reason)
    return n
