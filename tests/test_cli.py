"""Command-line tools run on absl (diffusion.cli): each keeps its flags in its own
registry, parses them in-process more than once, and starts as `python -m ...`."""
import importlib
import os
import pathlib
import subprocess
import sys

import pytest
from absl import app, flags

from diffusion import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOLS = ["diffusion.evaluation.fid", "diffusion.evaluation.train_classifier",
         "diffusion.evaluation.convert_inception", "diffusion.data.prepare",
         "diffusion.autoencoder.encode", "diffusion.autoencoder.evaluate",
         "diffusion.reflow_pairs",
         "experiments.throughput.run", "experiments.throughput.compile_time",
         "experiments.cpu_devices.run", "experiments.input_pipeline.run",
         "experiments.sampler_benchmark.run", "experiments.sampler_benchmark.fid_table",
         "experiments.text_to_image.run"]


def test_parse_starts_every_call_from_the_defaults():
    fv = flags.FlagValues()
    flags.DEFINE_integer("steps", 3, "", flag_values=fv)
    flags.DEFINE_bool("tiny", False, "", flag_values=fv)
    assert cli.parse(fv, ["prog", "a.npz", "--steps=5", "--tiny", "b.npz"]) == \
        ["prog", "a.npz", "b.npz"]
    assert (fv.steps, fv.tiny) == (5, True)
    cli.parse(fv, ["prog"])
    assert (fv.steps, fv.tiny) == (3, False)
    with pytest.raises(app.UsageError, match="steps"):
        cli.parse(fv, ["prog", "--steps=many"])
    with pytest.raises(app.UsageError, match="nope"):
        cli.parse(fv, ["prog", "--nope=1"])


@pytest.mark.parametrize("name", TOOLS)
def test_tools_define_no_global_flags(name):
    module = importlib.import_module(name)
    assert isinstance(module.FLAGS, flags.FlagValues) and module.FLAGS is not flags.FLAGS
    assert not set(module.FLAGS) & set(flags.FLAGS) - {"flagfile", "undefok"}


def test_no_argparse_and_no_sys_path_patches():
    files = list((ROOT / "experiments").rglob("*.py")) + [
        ROOT / (t.replace(".", "/") + ".py") for t in TOOLS if t.startswith("diffusion")]
    for path in files:
        text = path.read_text()
        assert "argparse" not in text and "sys.path" not in text, path


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_help_lists_the_flags_and_a_bad_flag_fails():
    out = _run("diffusion.data.prepare", "--help")
    assert out.returncode == 0 and "--dataset" in out.stdout and "--data_dir" in out.stdout
    out = _run("diffusion.data.prepare", "--dataset=x", "--no_such_flag=1")
    assert out.returncode == 1 and "no_such_flag" in out.stderr + out.stdout
    out = _run("experiments.input_pipeline.run", "--help")
    assert out.returncode == 0 and "--batches" in out.stdout
