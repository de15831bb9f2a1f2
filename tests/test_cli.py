"""Command-line tools run on absl (diffusion.cli): each keeps its flags in its own
registry, parses them in-process more than once, and starts as `python -m ...`."""
import json
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
         "experiments.text_to_image.run", "experiments.flow_vs_diffusion.cd_sigmas",
         "experiments.flow_vs_diffusion.cd_consistency_error",
         "experiments.flow_vs_diffusion.fid_ratio"]


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


def test_tools_define_no_global_flags():
    # In a fresh interpreter, so that what this test process imported before does not
    # matter; third-party libraries (orbax, chex) define global flags of their own.
    probe = ("import importlib, json, sys\n"
             "from absl import flags\n"
             "for name in sys.argv[1:]:\n"
             "    module = importlib.import_module(name)\n"
             "    assert isinstance(module.FLAGS, flags.FlagValues), name\n"
             "    assert module.FLAGS is not flags.FLAGS, name\n"
             "ours = {m: sorted(f.name for f in fl)\n"
             "        for m, fl in flags.FLAGS.flags_by_module_dict().items()\n"
             "        if m.startswith(('diffusion', 'experiments'))}\n"
             "print(json.dumps(ours))\n")
    out = subprocess.run([sys.executable, "-c", probe, *TOOLS], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


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
