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


def test_models_registry_builds_each_network_from_its_own_section():
    from configs.base import get_base_config
    from diffusion import models
    from diffusion.config_file import ConfigError
    c = get_base_config().model
    built = {}
    for name in models.MODELS:
        c.name = name
        built[name] = type(models.build_model(c, (28, 28, 1), 0))
    assert built == {"unet": models.UNet, "dit": models.DiT, "vae": models.AutoencoderKL}
    c.name = "unet"
    c.unet.attn_resolutions = (5,)  # the U-Net's own check: levels 28, 14, 7
    with pytest.raises(ConfigError, match=r"attn_resolutions=\(5,\): \[5\] is no level"):
        models.build_model(c, (28, 28, 1), 0)
    c.name = "transformer"
    with pytest.raises(ValueError, match="unknown model.name 'transformer'; known: "
                                         r"\['dit', 'unet', 'vae'\]"):
        models.build_model(c, (28, 28, 1), 0)


def test_parse_arg_reads_big_vision_style_arguments():
    from configs.base import is_tiny, parse_arg
    a = parse_arg("variant=B/2,runlocal,steps=7", variant="S/2", steps=0, guide=False)
    assert a.to_dict() == dict(variant="B/2", runlocal=True, steps=7, guide=False)
    assert parse_arg("", variant="S/2").to_dict() == dict(variant="S/2", runlocal=False)
    assert parse_arg(None).runlocal is False and parse_arg("guide=false", guide=True).guide is False
    assert is_tiny("runlocal") and not is_tiny("") and is_tiny(parse_arg("runlocal"))
    with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
        parse_arg("runlocal,bogus", variant="S/2")
    with pytest.raises(ValueError, match="config argument steps=many: not an int"):
        parse_arg("steps=many", steps=0)
    with pytest.raises(ValueError, match="config argument variant needs a value"):
        parse_arg("variant", variant="S/2")


def test_config_arguments_combine_with_runlocal():
    from configs import cd_cifar10, dit_fashion_mnist_cond
    c = dit_fashion_mnist_cond.get_config("variant=B/2,runlocal")
    assert c.model.dit.variant == "B/2" and c.data.source == "synthetic"
    full = dit_fashion_mnist_cond.get_config("variant=XL/2")
    # A named variant at its paper size: the config's own sizes are cleared.
    d = full.model.dit
    assert (d.variant, d.hidden_size, d.depth, d.num_heads) == ("XL/2", 0, 0, 0)
    assert cd_cifar10.get_config("teacher,runlocal").train.objective == "edm"
    assert cd_cifar10.get_config("runlocal").data.source == "synthetic"


def test_sweep_expands_with_distinct_workdirs():
    import launch
    from configs import ablation_schedule
    # The path as --config gives it, with the config argument (it once crashed on ":").
    runs = launch.sweep_runs(os.path.join(ROOT, "configs", "ablation_schedule.py:runlocal"),
                             ablation_schedule.get_config("runlocal"))
    assert [name for name, _ in runs] == ["diffusion.schedule=linear",
                                          "diffusion.schedule=cosine"]
    assert [c.diffusion.schedule for _, c in runs] == ["linear", "cosine"]


def test_sweep_names_use_full_dotted_keys(tmp_path):
    import launch
    from configs.base import get_base_config
    from diffusion.objectives.consistency_config import add_consistency_config
    path = tmp_path / "cfg.py"
    path.write_text("def sweep():\n    return [{'diffusion.weighting': 'snr'},\n"
                    "            {'consistency.weighting': 'snr', 'model.dit.variant': 'B/2'}]\n")
    runs = launch.sweep_runs(str(path) + ":runlocal", add_consistency_config(get_base_config()))
    assert [name for name, _ in runs] == [
        "diffusion.weighting=snr", "consistency.weighting=snr,model.dit.variant=B_2"]
    assert runs[1][1].consistency.weighting == "snr" and runs[1][1].model.dit.variant == "B/2"


def test_sweep_arms_select_and_print(tmp_path):
    import launch
    runs = [("a=1", None), ("a=2", None), ("a=3", None)]
    assert launch.select_arms(runs, -1) == runs
    assert launch.select_arms(runs, 1) == [("a=2", None)]
    with pytest.raises(ValueError, match="--sweep_index=3 is out of range: the sweep has 3"):
        launch.select_arms(runs, 3)
    argv = ["launch.py", "--config=configs/x.py:runlocal", "--workdir", "runs/x", "--sweep",
            "--sweep_print", "--config.train.num_steps=2"]
    cmds = launch.sweep_commands(argv, runs, python="python")
    assert cmds == [f"python launch.py --config=configs/x.py:runlocal --workdir runs/x --sweep "
                    f"--config.train.num_steps=2 --sweep_index={i}  # a={i + 1}"
                    for i in range(3)]


def test_sweep_index_trains_one_arm_in_its_named_folder(tmp_path):
    import subprocess
    import sys
    wd = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "launch.py", "--config=configs/ablation_schedule.py:runlocal",
         f"--workdir={wd}", "--sweep", "--sweep_index=1", "--config.train.num_steps=2",
         "--config.train.sample_every=0", "--config.train.checkpoint_every=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(wd)) == ["diffusion.schedule=cosine"]
    import json
    with open(wd / "diffusion.schedule=cosine" / "config.json") as f:
        assert json.load(f)["diffusion"]["schedule"] == "cosine"
