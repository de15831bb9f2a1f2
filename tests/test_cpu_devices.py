"""One XLA CPU device per core (diffusion.cpu_devices, launch.py --cpu_devices): when it
acts, how it picks the count, that it takes effect before JAX starts, and that samples
do not depend on the device count (training: tests/test_train.py, 8 devices equal 1)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.default import get_config
from diffusion import cpu_devices
from diffusion.train import loop
from diffusion.train.setup import build_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"JAX_PLATFORMS": "cpu"}


def test_auto_uses_cores_reduced_to_divide_the_batch():
    assert cpu_devices.resolve("auto", [32], env=CPU, cores=2)[0] == 2
    assert cpu_devices.resolve("auto", [32], env=CPU, cores=6)[0] == 4
    n, why = cpu_devices.resolve("auto", [30, 12], env=CPU, cores=8)
    assert n == 6 and "reduced to 6" in why
    assert cpu_devices.resolve("auto", [7], env=CPU, cores=4)[0] == 1
    assert cpu_devices.resolve("4", [32], env=CPU)[0] == 4
    with pytest.raises(ValueError, match=r"--cpu_devices=3 does not divide.*\[32\].*2"):
        cpu_devices.resolve("3", [32], env=CPU)
    with pytest.raises(ValueError, match="auto, off or a positive integer"):
        cpu_devices.resolve("many", [32], env=CPU)
    assert cpu_devices.resolve("off", [32], env=CPU)[0] is None


def test_left_alone_when_the_user_or_the_hardware_decides():
    for env in ({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"},
                {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu,cpu"}):
        n, why = cpu_devices.resolve("auto", [32], env=env, accelerator=False, cores=2)
        assert n is None and "left alone" in why
    assert cpu_devices.resolve("auto", [32], env={}, accelerator=True, cores=2)[0] is None
    # JAX_PLATFORMS=cpu forces the CPU backend even next to a GPU
    assert cpu_devices.resolve("auto", [32], env=CPU, accelerator=True, cores=2)[0] == 2
    assert cpu_devices.resolve("auto", [32], env={}, accelerator=False, cores=2)[0] == 2


def test_configure_takes_effect_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    code = ("from diffusion import cpu_devices; n = cpu_devices.configure('auto', [32]); "
            "import jax; print(n, jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    expect = cpu_devices.largest_divisor(cpu_devices.available_cores(), [32])
    assert out == [str(expect), str(expect)]
    # too late once JAX is imported (as here): nothing is changed
    flags = os.environ.get("XLA_FLAGS")
    assert cpu_devices.configure("auto", [32]) is None
    assert os.environ.get("XLA_FLAGS") == flags


def test_samples_do_not_depend_on_the_device_count(tmp_path):
    cfg = get_config("runlocal")
    samples = []
    for devices in (jax.devices()[:1], jax.devices()):
        run = build_run(cfg, str(tmp_path / str(len(devices))), devices)
        state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(0))
        # perturbed params: a fresh network's zero-init output layer would hide differences
        rng = np.random.default_rng(0)
        params = jax.tree.map(
            lambda a: np.asarray(a) + 0.05 * rng.standard_normal(a.shape).astype(a.dtype),
            jax.device_get(state.params))
        fn = loop.sample_fn_for(run, "ddim", 3, 8)
        samples.append(np.asarray(fn(params, jax.random.key(1), np.int32(0),
                                     np.float32(1.0))))
    assert np.abs(samples[0]).mean() > 1e-2
    np.testing.assert_allclose(samples[1], samples[0], rtol=1e-5, atol=1e-5)


def test_launched_test_processes_keep_the_other_xla_flags(monkeypatch):
    """tests/subprocess_env.with_devices: a launched process gets its own device count
    and keeps conftest's other XLA flags (the fusion-emitter setting halves its compile)."""
    from subprocess_env import with_devices
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                       "--xla_cpu_use_fusion_emitters=false --xla_foo=1")
    flags = with_devices(2)["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2",
                     "--xla_cpu_use_fusion_emitters=false", "--xla_foo=1"]
    monkeypatch.delenv("XLA_FLAGS")
    assert with_devices(1)["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
