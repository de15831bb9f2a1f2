"""A run's config.json is the truth (issue 9): resume refuses a changed model /
parameterisation / data key and writes nothing first; sample mode samples the run as it
was trained. Workdirs are faked (config.json plus a committed checkpoint directory), so
nothing trains or compiles here."""
import json
import os

import pytest

from configs.default import get_config
from diffusion.checkpointing import COMMIT_FILE
from diffusion.train import loop
from diffusion.train.generate import sample_from_workdir
from diffusion.config_file import write_config
from diffusion.train.setup import build_run
from diffusion.config_file import ConfigError


def _trained_workdir(tmp_path, **changes):
    """A workdir as a runlocal run (v-prediction) leaves it: config.json and step 2."""
    cfg = get_config("runlocal")
    for key, value in changes.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    workdir = str(tmp_path / "run")
    write_config(cfg, workdir)
    os.makedirs(os.path.join(workdir, "checkpoints", "2"))
    open(os.path.join(workdir, "checkpoints", "2", COMMIT_FILE), "w").close()
    return workdir, cfg


def _files(workdir):
    """Every file under workdir but hidden ones (the run's `.lock` is not its output)."""
    return sorted(os.path.relpath(os.path.join(d, f), workdir)
                  for d, _, fs in os.walk(workdir) for f in fs if not f.startswith("."))


@pytest.mark.parametrize("key,value", [("diffusion.pred_type", "eps"),
                                       ("diffusion.schedule", "linear"),
                                       ("data.image_size", 16),
                                       ("model.unet", {"ch": 32})])
def test_resume_refuses_a_changed_model_key_and_writes_nothing(tmp_path, key, value):
    workdir, cfg = _trained_workdir(tmp_path)
    with open(os.path.join(workdir, "config.json")) as f:
        before, files = f.read(), _files(workdir)
    section, leaf = key.split(".")
    if isinstance(value, dict):
        cfg[section][leaf].update(value)
        key = f"{key}.ch"
    else:
        cfg[section][leaf] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        loop.train_and_evaluate(cfg, workdir)
    assert "config.json has" in str(err.value)
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == before
    assert _files(workdir) == files


def test_resume_may_extend_the_run_and_change_the_optimizer(tmp_path):
    workdir, cfg = _trained_workdir(tmp_path)
    cfg.train.num_steps = 100
    cfg.optim.lr = 1e-4
    cfg.sample.num_steps = 7
    cfg.data.global_batch_size = 16
    run = build_run(cfg, workdir)  # no error
    run.checkpointer.close()


def test_sample_mode_uses_the_runs_config_and_rejects_model_overrides(tmp_path):
    from diffusion.train.run_config import sample_config
    workdir, _ = _trained_workdir(tmp_path)
    eps = get_config("runlocal")
    eps.diffusion.pred_type = "eps"       # the bug: a v run sampled as eps
    eps.sample.num_steps = 3
    # Library call without the list of explicit overrides: strict.
    with pytest.raises(ConfigError, match=r"diffusion\.pred_type.*'v'.*'eps'"):
        sample_from_workdir(eps, workdir)
    # From launch.py: the explicit override is an error naming both values ...
    with pytest.raises(ConfigError, match=r"diffusion\.pred_type.*'v'.*'eps'"):
        sample_config(eps, workdir, overrides=["diffusion.pred_type", "sample.num_steps"])
    # ... while a value that only comes from the config file gives way to config.json.
    cfg = sample_config(eps, workdir, overrides=["sample.num_steps"])
    assert cfg.diffusion.pred_type == "v" and cfg.sample.num_steps == 3
    assert sample_config(None, workdir).sample.num_steps == get_config("runlocal").sample.num_steps
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["diffusion"]["pred_type"] == "v"


def test_launch_sample_mode_names_a_contradicting_override(tmp_path):
    # Through launch.py: only the explicit override is checked (the config file's own
    # values give way to config.json), and the error names the key and both values.
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir, _ = _trained_workdir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "launch.py", "--config=configs/default.py:runlocal",
         f"--workdir={workdir}", "--mode=sample", "--config.diffusion.pred_type=eps"],
        cwd=root, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "diffusion.pred_type: config.json has 'v', the given config 'eps'" in out, out[-2000:]
