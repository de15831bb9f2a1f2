"""train.profile_steps: a jax.profiler trace of a window of jitted steps lands under
WORKDIR/plugins/profile, where TensorBoard's Profile tab reads it."""
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from configs.base import get_base_config
from diffusion.train import validate
from diffusion.train.profiling import StepProfiler, parse_profile_steps


def _run(spec, workdir, num_steps):
    step_fn = jax.jit(lambda s: {"w": s["w"] * 0.5 + 1.0, "step": s["step"] + 1},
                      donate_argnums=0)
    state = {"w": jnp.ones((64, 64)), "step": jnp.zeros((), jnp.int32)}
    with StepProfiler(spec, workdir) as profiler:
        step = 0
        while step < num_steps:
            profiler.before_step(step, state)
            state = step_fn(state)
            step += 1
        profiler.finish(state)
    assert not profiler.active
    return glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))


def test_trace_of_a_step_window_is_written(tmp_path):
    assert _run("1,3", str(tmp_path / "a"), 4)
    # A window running past the last step is closed by finish().
    assert _run("2,100", str(tmp_path / "b"), 3)


def test_off_by_default_writes_nothing(tmp_path):
    assert get_base_config().train.profile_steps == ""
    assert not _run("", str(tmp_path), 2)
    assert not os.path.exists(tmp_path / "plugins")


@pytest.mark.parametrize("spec", ["10", "a,b", "5,5", "-1,3", "1,2,3"])
def test_bad_window_names_the_key(spec):
    with pytest.raises(ValueError, match="train.profile_steps"):
        parse_profile_steps(spec)
    c = get_base_config()
    c.train.profile_steps = spec
    with pytest.raises(validate.ConfigError, match="train.profile_steps"):
        validate.check_config(c, 1)


def test_parse():
    assert parse_profile_steps("10, 15") == (10, 15)
    assert parse_profile_steps(None) is None


def test_training_run_writes_the_trace_of_its_window(tmp_path):
    from configs.default import get_config
    from diffusion.train import loop
    cfg = get_config("runlocal")
    cfg.train.update(num_steps=3, sample_every=0, eval_every=0, profile_steps="1,2")
    loop.train_and_evaluate(cfg, str(tmp_path))
    assert glob.glob(os.path.join(str(tmp_path), "plugins", "profile", "*", "*.xplane.pb"))
