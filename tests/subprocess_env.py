"""A shared test helper: the environment of a launched process with its own CPU device
count."""
import os
import re

from diffusion.cpu_devices import DEVICE_COUNT_FLAG

_DEVICE_COUNT = re.compile(re.escape(DEVICE_COUNT_FLAG) + r"=\d+\s*")


def with_devices(n: int) -> dict:
    """os.environ with XLA_FLAGS' device count set to n and the other XLA flags kept
    (tests/conftest.py's: without them a launch's train-step compile took 9.7 s instead
    of 3.9 s)."""
    others = _DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", "")).strip()
    return dict(os.environ, XLA_FLAGS=f"{DEVICE_COUNT_FLAG}={n} {others}".strip())
