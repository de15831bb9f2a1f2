"""Every config loads (full and tiny), is locked against typos, and sweeps expand."""
import glob
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "base")))


def test_there_are_configs():
    assert {"default", "fashion_mnist_gpu", "cifar10_ddpm", "ablation_schedule"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_full_and_tiny(name):
    module = importlib.import_module(f"configs.{name}")
    from configs.base import get_base_config
    base_keys = set(get_base_config().to_dict())
    for arg in ("", "runlocal"):
        c = module.get_config(arg)
        assert base_keys <= set(c.to_dict()), f"{name} dropped base keys"
    assert module.__doc__ and "launch.py --config configs/" in module.__doc__
    with pytest.raises(ValueError, match="unknown config argument"):
        module.get_config("bogus")


def test_default_config_is_the_documented_one():
    from configs.default import get_config
    c = get_config()
    assert c.data.source == "fashion_mnist_idx" and c.model.name == "unet"


def test_cifar10_config_builds_the_35_7m_unet():
    import jax
    import jax.numpy as jnp
    from configs.cifar10_ddpm import get_config
    from diffusion.models import build_model
    c = get_config()
    model = build_model(c.model, (32, 32, 3), 0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                            jnp.zeros((1,)))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert abs(n - 35_746_307) / 35_746_307 < 0.005


def test_sweep_expands_with_distinct_workdirs():
    import launch
    from configs import ablation_schedule
    runs = launch.sweep_runs(os.path.join(ROOT, "configs", "ablation_schedule.py"),
                             ablation_schedule.get_config("runlocal"))
    assert [name for name, _ in runs] == ["schedule=linear", "schedule=cosine"]
    assert [c.diffusion.schedule for _, c in runs] == ["linear", "cosine"]
