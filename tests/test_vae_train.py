"""The "vae" objective and latent diffusion, end to end on tiny models: a VAE trained
through the loop (discriminator from disc_start, reconstructions written), its step
lowering the reconstruction error, latents through the data pipeline unchanged, and a
latent DiT trained on encoded latents whose samples are decoded to pixels."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import app
from PIL import Image

from configs import ldm_fashion_mnist, vae_fashion_mnist
from diffusion import parallel
from diffusion.autoencoder.decode import reconstruct
from diffusion.autoencoder.encode import encode_dataset
from diffusion.data import BatchIterator, make_source
from diffusion.data.latents import LatentSource
from diffusion.objectives.vae import fixed_images
from diffusion.train import loop, sample_from_workdir
from diffusion.train.setup import build_run


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny VAE trained for 4 steps (disc_start=2) through train_and_evaluate."""
    workdir = str(tmp_path_factory.mktemp("vae"))
    config = vae_fashion_mnist.get_config("runlocal")
    metrics = loop.train_and_evaluate(config, workdir)
    return config, workdir, metrics


def test_vae_run_logs_metrics_and_writes_reconstructions(vae_run):
    config, workdir, metrics = vae_run
    assert metrics["step"] == 4 and np.isfinite(metrics["loss"])
    rows = {r["step"]: r for r in _jsonl(os.path.join(workdir, "metrics.jsonl"))}
    # Metrics of step k come from state.step = k - 1: disc_start = 2 is inside step 3.
    assert rows[2]["disc_factor"] == 0 and rows[2]["d_loss"] == 0
    assert rows[4]["disc_factor"] == 1 and rows[4]["d_loss"] > 0
    for key in ("rec_loss", "kl", "g_loss", "d_weight", "psnr", "ssim", "grad_norm"):
        assert np.isfinite(rows[4][key]), key
    # Reconstruction grid: 4 originals over their 4 reconstructions, 2 per row, 8x8 RGB.
    png = Image.open(os.path.join(workdir, "samples", "reconstructions_ema_0000004.png"))
    assert png.mode == "RGB" and png.size == (2 * 8 + 3 * 2, 4 * 8 + 5 * 2)
    assert os.path.exists(os.path.join(workdir, "samples", "reconstructions_raw_0000004.png"))


@pytest.fixture(scope="module")
def vae_states(vae_run):
    """The fixture run's initial state and its checkpoints after steps 2 and 4."""
    config, workdir, _ = vae_run
    run = build_run(config, workdir)
    init = jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(config.seed))
    states = {0: init}
    for step in (2, 4):
        states[step], _ = run.checkpointer.restore(run.abstract_state, step)
    run.checkpointer.close()
    return run, states


def test_vae_steps_lower_error_and_discriminator_waits_for_disc_start(vae_states):
    run, states = vae_states
    assert run.config.vae_loss.disc_start == 2
    assert set(states[0].aux) == {"disc", "disc_opt"}
    disc = {k: jax.device_get(s.aux["disc"]) for k, s in states.items()}
    # Steps 1-2 run at state.step 0-1 < disc_start: the discriminator is untouched.
    jax.tree.map(np.testing.assert_array_equal, disc[2], disc[0])
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), disc[4], disc[2])
    assert max(jax.tree.leaves(moved)) > 0
    # Its optimizer has stepped twice (steps 3-4), so its warm-up starts at disc_start.
    counts = optax.tree_utils.tree_get_all_with_path(states[4].aux["disc_opt"], "count")
    assert counts and all(int(c) == 2 for _, c in counts)
    # The autoencoder learns: L1 error of posterior-mean reconstructions of a fixed batch
    # (the visualize batch, so the compiled function is shared).
    x = fixed_images(run.source, run.config.sample.num_samples, run.image_shape)
    x_dev = jax.device_put(x, parallel.replicated(run.mesh))
    error = {k: float(np.abs(np.asarray(reconstruct(run.model, states[k].params, x_dev)) -
                             x).mean()) for k in (0, 4)}
    assert error[4] < 0.95 * error[0], error


class _Images:
    """Duck-typed uint8 source for encode_dataset."""
    image_shape, num_classes = (4, 4, 1), 2

    def __len__(self):
        return 10

    def get(self, indices):
        indices = np.asarray(indices)
        pix = (indices[:, None, None, None] * 11 + np.arange(16).reshape(1, 4, 4, 1)) % 256
        return {"image": pix.astype(np.uint8), "label": (indices % 2).astype(np.int32)}


def test_latents_pass_through_the_batch_iterator_unchanged(tmp_path):
    def encode(x):  # 2x2 mean pool, values outside [-1, 1] after scaling
        mean = x.reshape(x.shape[0], 2, 2, 2, 2, 1).mean(axis=(2, 4))
        return mean, np.full_like(mean, -4.0)
    encode_dataset(_Images(), encode, str(tmp_path), shard_size=4, batch_size=3,
                   scale_factor=3.0, log=None)
    source = make_source(f"latents:{tmp_path}")
    assert isinstance(source, LatentSource) and source.image_shape == (2, 2, 1)
    it = BatchIterator(source, 6, seed=1, image_size=(2, 2))
    for k in range(3):
        batch = next(it)
        expected = source.get(it.indices_at(k))
        assert batch["image"].dtype == np.float32
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])
    assert np.abs(batch["image"]).max() > 1.0  # not squashed into [-1, 1]
    with pytest.raises(ValueError, match="random_flip"):
        BatchIterator(source, 6, seed=1, random_flip=True)


def test_latent_vae_settings_need_a_latent_source(tmp_path, vae_run):
    config = ldm_fashion_mnist.get_config("runlocal")
    config.latent.vae_workdir = vae_run[1]
    run = build_run(config, str(tmp_path))
    with pytest.raises(ValueError, match="not a latent dataset"):
        loop.sample_fn_for(run, "ddim", 2, 8)


def test_latent_diffusion_trains_and_decodes_samples(vae_run, tmp_path):
    from diffusion.autoencoder.encode import main as encode_main
    _, vae_workdir, _ = vae_run
    latent_dir = str(tmp_path / "latents")
    # The VAE was trained on synthetic 32x32x3 images resized to 8x8: encode those.
    encode_main(["encode", "--vae", vae_workdir, "--source", "synthetic:32x32x3:48",
                 "--image_size=8", "--out", latent_dir, "--shard_size=32", "--batch_size=8"])
    source = LatentSource(latent_dir)
    assert source.image_shape == (4, 4, 4) and source.scale_factor > 0

    config = ldm_fashion_mnist.get_config("runlocal")
    config.data.source = f"latents:{latent_dir}"
    config.data.image_size = 0
    config.latent.vae_workdir = vae_workdir
    config.sample.clip_x0 = 0.0
    workdir = str(tmp_path / "ldm")
    metrics = loop.train_and_evaluate(config, workdir)
    assert metrics["step"] == 4 and np.isfinite(metrics["loss"])
    # 8 decoded samples of 8x8x3 pixels (not 4x4x4 latents), 3 per row.
    png = Image.open(os.path.join(workdir, "samples", "samples_ema_0000004.png"))
    assert png.mode == "RGB" and png.size == (3 * 8 + 4 * 2, 3 * 8 + 4 * 2)

    config.sample.num_samples = 5
    with np.load(sample_from_workdir(config, workdir)) as out:  # ADM's layout: arr_0
        assert out.files == ["arr_0", "arr_1"]  # class-conditional: labels in arr_1
        np.testing.assert_array_equal(out["arr_1"], np.arange(5) % 10)
        assert out["arr_0"].shape == (5, 8, 8, 3) and out["arr_0"].dtype == np.uint8
        assert out["arr_0"].std() > 0


def test_reconstruction_metrics_cli_and_rfid(vae_run, capsys):
    from diffusion.evaluation import FeatureNetwork
    from diffusion.autoencoder.evaluate import evaluate_reconstructions, main
    from diffusion.pretrained import load_vae
    _, workdir, _ = vae_run
    returned = main(["evaluate", "--workdir", workdir, "--num_examples=6", "--batch_size=4",
                     "--no_fid"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == returned
    assert out["num_examples"] == 6 and np.isfinite(out["psnr"]) and -1 < out["ssim"] < 1
    with pytest.raises(app.UsageError, match="workdir"):
        main(["evaluate", "--no_fid"])
    with pytest.raises(app.UsageError, match="num_examples"):
        main(["evaluate", f"--workdir={workdir}", "--num_examples=0"])

    # rFID with a stand-in feature network (channel means and stds: 6-d features).
    def stats(v, x):
        f = jnp.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
        return {"pool": f, "logits": f}
    features = FeatureNetwork("moments", stats, {})
    vae, params, scale = load_vae(workdir, devices=jax.devices()[:1])
    assert scale is None  # a VAE trained here has no scale of its own
    x = make_source("synthetic", "test").get(np.arange(8), (8, 8))["image"] / 127.5 - 1
    batches = [x[:4].astype(np.float32), x[4:].astype(np.float32)]
    metrics = evaluate_reconstructions(vae, params, batches, features)
    x_hat = np.concatenate([np.asarray(reconstruct(vae, params, b)) for b in batches])
    mse = np.square(x_hat - x).mean(axis=(1, 2, 3))
    assert metrics["psnr"] == pytest.approx(np.mean(10 * np.log10(4 / mse)), rel=1e-4)
    assert metrics["rfid_moments@8"] > 0
