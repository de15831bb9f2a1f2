"""diffusion.load(workdir): a tiny trained run as a library object. EMA params equal the
checkpoint's, sampling works with several samplers, no dataset is needed, step= picks
the checkpoint, missing runs fail naming the path, and the quickstart notebook runs."""
import dataclasses
import functools
import json
import os
import runpy
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import diffusion
from configs.vae_fashion_mnist import get_config as vae_config
from diffusion import pretrained, sampling
from diffusion.config_file import read_run_config
from diffusion.models import build_model
from diffusion.train.setup import build_run

from param_noise import perturbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NUM, STEPS = 16, 2  # the quickstart's batch: its compiled samplers are shared


@pytest.fixture(scope="module")
def workdir(tiny_default_run):
    """A trained tiny run (tests/conftest.py): checkpoints at steps 2 and 4."""
    return tiny_default_run


@pytest.fixture(scope="module")
def pipe(workdir):
    return diffusion.load(workdir)


def _checkpoint_ema(workdir, step):
    run = build_run(read_run_config(workdir), workdir)
    try:
        state, _ = run.checkpointer.restore(run.abstract_state, step)
    finally:
        run.checkpointer.close()
    return jax.device_get(state.ema_params)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_ema_params_equal_the_checkpoints(workdir, pipe):
    assert pipe.step == 4 and pipe.image_shape == (8, 8, 3) and pipe.num_classes == 0
    _assert_trees_equal(pipe.params, _checkpoint_ema(workdir, 4))
    assert isinstance(pipe.denoiser, diffusion.denoiser.Denoiser)


def test_sample_with_two_samplers(pipe):
    for name in ("ddim", "heun"):
        x = pipe.sample(name, steps=STEPS, num=NUM, seed=0)
        assert x.shape == (NUM, 8, 8, 3) and x.dtype == np.float32
        assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
    again = pipe.sample("heun", steps=STEPS, num=NUM, seed=0, batch_size=8)
    # The noise does not depend on the batch (noise drawn per batch would differ by O(1));
    # the two programs (batch 3 and 8) round differently, by up to about 1e-5.
    np.testing.assert_allclose(again, x, atol=5e-5)
    with pytest.raises(ValueError, match="unconditional"):
        pipe.sample("ddim", steps=STEPS, num=NUM, labels=[0] * NUM)


def test_step_picks_that_checkpoint(workdir, pipe):
    early = diffusion.load(workdir, step=2)
    assert early.step == 2
    _assert_trees_equal(early.params, _checkpoint_ema(workdir, 2))
    leaf = lambda p: np.asarray(jax.tree.leaves(p)[0])
    assert not np.array_equal(leaf(early.params), leaf(pipe.params))
    with pytest.raises(FileNotFoundError, match=r"step 3 .*finished steps: \[2, 4\]"):
        diffusion.load(workdir, step=3)


def _copy_with_config(workdir, dest, **data):
    shutil.copytree(workdir, dest)
    path = os.path.join(dest, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["data"].update(data)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(dest)


def test_loads_without_the_dataset(workdir, pipe, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("load() must not build the data source")
    monkeypatch.setattr("diffusion.data.registry.make_source", no_data)
    monkeypatch.setattr("diffusion.train.setup.make_source", no_data)
    # A dataset that is not there, whose name does not tell the channels: read from the
    # checkpoint's parameter shapes.
    moved = _copy_with_config(workdir, tmp_path / "moved", source="tfds:not_here",
                              data_dir=str(tmp_path / "nowhere"))
    loaded = diffusion.load(moved)
    assert loaded.image_shape == (8, 8, 3)
    _assert_trees_equal(loaded.params, pipe.params)
    np.testing.assert_array_equal(loaded.sample("ddim", steps=STEPS, num=NUM),
                                  pipe.sample("ddim", steps=STEPS, num=NUM))
    # Nor the size: the error says how to give it.
    unsized = _copy_with_config(workdir, tmp_path / "unsized", source="tfds:not_here",
                                image_size=0)
    with pytest.raises(ValueError, match=r"image_shape=\(H, W, C\)"):
        diffusion.load(unsized)
    assert diffusion.load(unsized, image_shape=(8, 8, 3)).image_shape == (8, 8, 3)


def test_missing_run_or_checkpoint_names_the_path(workdir, tmp_path):
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        diffusion.load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no config.json"):
        diffusion.load(str(empty))
    shutil.copy(os.path.join(workdir, "config.json"), empty / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no finished checkpoint in {empty}/checkpoints"):
        diffusion.load(str(empty))
    assert os.listdir(empty) == ["config.json"]  # a reader creates nothing


def test_import_diffusion_stays_light():
    code = "import sys, diffusion; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_quickstart_runs_and_matches_its_notebook(workdir, tmp_path, monkeypatch):
    sync = runpy.run_path(os.path.join(NOTEBOOKS, "sync_quickstart.py"))
    with open(os.path.join(NOTEBOOKS, "quickstart.py")) as f:
        twin = sync["cells_of"](f.read())
    with open(os.path.join(NOTEBOOKS, "quickstart.ipynb")) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    cells = [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]
    assert cells == twin, "run `python notebooks/sync_quickstart.py` after editing the twin"

    monkeypatch.setenv("WORKDIR", workdir)
    monkeypatch.setenv("STEPS", str(STEPS))
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(os.path.join(NOTEBOOKS, "quickstart.py"))
    assert [r.shape for r in ns["rows"]] == [(NUM, 8, 8, 3)] * 3
    assert os.path.getsize(tmp_path / "quickstart_samples.png") > 0


def test_class_conditional_labels_and_guidance(pipe):
    """A conditional network (random weights) in a Pipeline: the default labels and
    guidance sample exactly as training's make_sample_fn; labels and w take effect."""
    k = 10
    config = pipe.config.copy_and_resolve_references()
    config.conditioning.num_classes = k
    model = build_model(config.model, pipe.image_shape, k, False)
    x, t, y = np.zeros((1, 8, 8, 3), np.float32), np.zeros(1, np.float32), np.zeros(1, np.int32)
    # Jitted (one program) and perturbed on the host: eagerly, each op of the init and
    # each leaf's add compiled a program of its own (~130 of them).
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(1), x, t, y)
    # zero-initialised layers (the label embedding) too
    params = perturbed(jax.device_get(variables["params"]), 0.05, seed=0)
    cond = dataclasses.replace(pipe, config=config, model=model, params=params, num_classes=k,
                               _fns={})
    default = cond.sample("ddim", steps=STEPS, num=NUM, guidance=2.0)
    fn = sampling.make_sample_fn(lambda p: cond.objective.denoiser(cond, p),
                                 image_shape=cond.image_shape, num_classes=k, sampler="ddim",
                                 num_steps=STEPS, batch_size=NUM, mesh=cond.mesh,
                                 options=sampling.sampler_options(config.sample, "ddim"))
    expected = sampling.generate(fn, params, jax.random.key(0), NUM, NUM, 2.0)
    np.testing.assert_allclose(default, np.clip(expected, -1, 1), atol=1e-5)
    same = cond.sample("ddim", steps=STEPS, num=NUM, guidance=2.0, labels=np.arange(NUM) % k)
    np.testing.assert_array_equal(same, default)
    other = cond.sample("ddim", steps=STEPS, num=NUM, guidance=2.0, labels=[3] * NUM)
    assert not np.allclose(other, default)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        cond.sample("ddim", steps=STEPS, num=NUM, labels=[k] * NUM)


def test_latent_run_decodes_with_its_vae(pipe, tmp_path):
    """A latent run (random denoiser and VAE weights): samples latents of the shape in
    the latent dataset's manifest.json and returns them decoded, as images."""
    latents = tmp_path / "latents"
    latents.mkdir()
    (latents / "manifest.json").write_text(json.dumps({"latent_shape": [4, 4, 4],
                                                       "scale_factor": 0.5}))
    config = pipe.config.copy_and_resolve_references()
    config.data.update(source=f"latents:{latents}", image_size=0)
    config.sample.clip_x0 = 0.0
    config.model.unet.attn_resolutions = (4,)  # the tiny U-Net's one level is the latents'
    assert pretrained.config_image_shape(config, "run") == (4, 4, 4)
    model = build_model(config.model, (4, 4, 4), 0, False)
    params = jax.jit(functools.partial(model.init, train=False))(  # jitted: one program
        jax.random.key(1), np.zeros((1, 4, 4, 4), np.float32), np.zeros(1, np.float32),
        None)["params"]
    vae = build_model(vae_config("runlocal").model, (8, 8, 3), 0)  # 8x8x3 <-> 4x4x4
    vae_params = jax.jit(vae.init)(jax.random.key(2),
                                   np.zeros((1, 8, 8, 3), np.float32))["params"]
    latent = dataclasses.replace(pipe, config=config, model=model, params=params,
                                 image_shape=(4, 4, 4), _fns={}, _vae=(vae, vae_params))
    x = latent.sample("ddim", steps=STEPS, num=NUM)
    assert x.shape == (NUM, 8, 8, 3) and np.isfinite(x).all() and np.abs(x).max() <= 1.0
