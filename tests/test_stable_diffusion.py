"""Stable Diffusion end to end: a tiny random StableDiffusionPipeline saved by diffusers
(U-Net, CLIP text encoder, VAE, tokenizer files, scheduler config) in a temporary
folder, loaded by `load_stable_diffusion`, gives diffusers' images for the same prompts,
negative prompts and initial latents under DDIM and DPM-Solver++ 2M (with and without
Karras sigmas), to 1e-3 in [0, 1].

Two variants: SD-1 style (eps prediction, conv proj_in/proj_out, quick-GELU text
encoder, the pad token <|endoftext|>, a PNDM scheduler file without timestep_spacing as
SD 1.5 ships it, so each sampler takes its diffusers class's default spacing) and SD-2
style (v prediction, linear projections, per-block heads, GELU, pad "!", a DDIM file
with trailing spacing; clip_skip=1 in one run). Every weight is randomised (norm scales
and biases too) so that no zero-initialised layer hides a wrong mapping; the latents are
16 x 8 (non-square) so a transposed axis fails. Plus: seeds and devices, every sampler
runs, and the errors.
"""
from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import samplers
from diffusion.models.unet_sd import UNetSDConfig
from diffusion.stable_diffusion import load_stable_diffusion, scheduler as sched
from diffusion.text.learn_bpe import learn_bpe, write_vocabulary

from subprocess_env import with_devices

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


PROMPTS = ["a photo of a cat on the mat", "a painting of the sea at night, with stars"]
NEGATIVE = ["blurry photo", "a dark painting"]
CORPUS = PROMPTS + NEGATIVE + ["a photo of a dog", "the sea is blue"]
HEIGHT, WIDTH, NUM, STEPS = 32, 16, 2, 8  # VAE factor 2: latents 16 x 8
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             num_train_timesteps=1000)

VARIANTS = {
    "sd1": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=2, norm_num_groups=8),
        text=dict(hidden_act="quick_gelu"), pad="<|endoftext|>",
        scheduler=(diffusers.PNDMScheduler, dict(skip_prk_steps=True, steps_offset=1,
                                                 set_alpha_to_one=False)),
        # SD 1.5's file: no timestep_spacing, and a clip_sample PNDM does not know.
        drop=("timestep_spacing",), add=dict(clip_sample=False)),
    "sd2": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4), norm_num_groups=16,
                  use_linear_projection=True, upcast_attention=True),
        text=dict(hidden_act="gelu"), pad="!",
        scheduler=(diffusers.DDIMScheduler, dict(prediction_type="v_prediction",
                                                 timestep_spacing="trailing", steps_offset=1,
                                                 set_alpha_to_one=False, clip_sample=False)),
        drop=(), add={}),
}
# (id, our sampler and options, the diffusers scheduler the pipeline switches to).
RUNS = [
    ("ddim", dict(sampler="ddim"), diffusers.DDIMScheduler, {}),
    ("dpmpp_2m", dict(sampler="dpmpp_2m", karras=False),
     diffusers.DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m_karras", dict(sampler="dpmpp_2m", karras=True),
     diffusers.DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
]


def _randomise(model, seed: int):
    """Every parameter redrawn: norm scales around 1, biases around 0, weights at
    1/sqrt(fan-in), so no zero-initialised layer is left."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))
    return model.eval()


def _save_pipeline(folder, variant: dict, seed: int):
    tok_dir = folder.parent / f"{folder.name}_tokenizer"
    vocab = write_vocabulary(tok_dir, learn_bpe(CORPUS))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": variant["pad"]}))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    assert tokenizer.pad_token == variant["pad"]
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=tokenizer.pad_token_id,
        **variant["text"]))
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                          cross_attention_dim=32, **variant["unet"])
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1,
                                  norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.3)
    cls, sched_kwargs = variant["scheduler"]
    pipe = diffusers.StableDiffusionPipeline(
        vae=_randomise(vae, seed), text_encoder=_randomise(text, seed + 1),
        tokenizer=tokenizer, unet=_randomise(unet, seed + 2),
        scheduler=cls(**BETAS, **sched_kwargs), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text())
    for key in variant["drop"]:
        config.pop(key)
    file.write_text(json.dumps({**config, **variant["add"]}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


_BUILT: dict = {}


def _pipelines(variant: str, tmp_path_factory):
    """(variant, diffusers pipeline, ours, the scheduler config file's dict), built once."""
    if variant not in _BUILT:
        folder = tmp_path_factory.mktemp(variant) / "sd"
        theirs = _save_pipeline(folder, VARIANTS[variant], seed=len(variant))
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        _BUILT[variant] = variant, theirs, load_stable_diffusion(folder), config
    return _BUILT[variant]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pipelines(request, tmp_path_factory):
    return _pipelines(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _pipelines("sd1", tmp_path_factory)[2]


def _latents(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(
        (n, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)


@pytest.mark.parametrize("run_id,ours_kw,cls,cls_kw", RUNS, ids=[r[0] for r in RUNS])
def test_images_equal_diffusers(pipelines, run_id, ours_kw, cls, cls_kw):
    variant, theirs, ours, config = pipelines
    clip_skip = 1 if (variant, run_id) == ("sd2", "dpmpp_2m_karras") else None
    x_T = _latents(len(PROMPTS) * NUM)
    # What a diffusers user does: switch the scheduler, built from the saved file.
    theirs.scheduler = cls.from_config(config, **cls_kw)
    text = dict(prompt=PROMPTS)
    if clip_skip:  # diffusers' clip-skip branch, by hand: diffusers 0.42 looks for
        # text_encoder.text_model, which transformers 5's CLIPTextModel no longer has.
        ids = theirs.tokenizer(PROMPTS, padding="max_length", max_length=77,
                               truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            states = theirs.text_encoder(ids, output_hidden_states=True).hidden_states
            text = dict(prompt_embeds=theirs.text_encoder.final_layer_norm(
                states[-(clip_skip + 1)]))
    ref = theirs(**text, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                 num_inference_steps=STEPS, guidance_scale=7.5, num_images_per_prompt=NUM,
                 latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()),
                 output_type="np").images
    got = ours.generate(PROMPTS, NEGATIVE, steps=STEPS, guidance=7.5, num=NUM,
                        height=HEIGHT, width=WIDTH, latents=x_T, clip_skip=clip_skip,
                        devices=jax.devices()[:1], **ours_kw)
    assert got.shape == ref.shape == (len(PROMPTS) * NUM, HEIGHT, WIDTH, 3)
    assert ref.std() > 0.05  # a real image, not a constant
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    # The prompts matter: another negative prompt gives other images.
    if run_id == "ddim":
        other = ours.generate(PROMPTS, None, sampler="ddim", steps=STEPS, num=NUM,
                              height=HEIGHT, width=WIDTH, latents=x_T,
                              devices=jax.devices()[:1])
        assert np.abs(other - got).max() > 1e-2


def test_seed_not_devices_decides_the_image(sd1):
    """Same seed and prompts: the same images on 1 and 8 devices (the batch split over
    them); another seed, other images. Row i's start noise is fold_in(key(seed), i)."""
    kw = dict(sampler="dpmpp_2m", karras=True, steps=STEPS, num=NUM, height=HEIGHT,
              width=WIDTH)
    one = sd1.sample(PROMPTS, NEGATIVE, seed=3, devices=jax.devices()[:1], **kw)
    assert one.dtype == np.uint8 and one.shape == (len(PROMPTS) * NUM, HEIGHT, WIDTH, 3)
    assert len(jax.devices()) == 8  # conftest's fake CPU devices
    eight = sd1.sample(PROMPTS, NEGATIVE, seed=3, **kw)
    # Sharding may reorder float sums: allow a rounding flip of one level.
    assert np.abs(one.astype(int) - eight.astype(int)).max() <= 1
    assert (one == eight).mean() > 0.99
    other = sd1.sample(PROMPTS, NEGATIVE, seed=4, devices=jax.devices()[:1], **kw)
    assert np.abs(one.astype(int) - other.astype(int)).mean() > 5
    # The start noise is initial_latents(seed): given explicitly, the same images.
    x_T = sd1.initial_latents(len(PROMPTS) * NUM, seed=3, height=HEIGHT, width=WIDTH)
    given = sd1.sample(PROMPTS, NEGATIVE, latents=x_T, devices=jax.devices()[:1], **kw)
    np.testing.assert_array_equal(given, one)


class _StandIn(nn.Module):
    """A stand-in for the U-Net with its call (x, t, context) -> like x and its config:
    compiles in a fraction of the time, for the tests of what the pipeline does around
    the network."""
    config: UNetSDConfig

    @nn.compact
    def __call__(self, x, t, context):
        c = nn.Dense(x.shape[-1])(context.mean(axis=1))[:, None, None, :]
        return 0.5 * nn.Conv(x.shape[-1], (3, 3))(x) + c * jnp.cos(t / 300.0)[:, None, None, None]


@pytest.fixture(scope="module")
def stand_in(sd1):
    net = _StandIn(sd1.unet.config)
    params = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
                               jnp.zeros((1, 77, 32)))["params"]
    return dataclasses.replace(sd1, unet=net, unet_params=params, _cache={})


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_every_sampler_runs(stand_in, name):
    """Each registered sampler through the pipeline (text, guided network, decoder) with
    the options `scheduler.setup` derives for it: finite images that follow the prompt."""
    kw = dict(sampler=name, steps=3, height=16, width=16, devices=jax.devices()[:1])
    a = stand_in.generate(PROMPTS[:1], **kw)
    b = stand_in.generate(PROMPTS[1:], **kw)
    assert a.shape == (1, 16, 16, 3) and np.isfinite(a).all()
    assert np.abs(a - b).max() > 1e-4


def test_batching_and_guidance(stand_in):
    """Rows do not depend on the batch size; w = 1 is the prompt alone (the negative
    prompt is not used), w != 1 uses it."""
    kw = dict(sampler="ddim", steps=3, height=16, width=16, num=3, devices=jax.devices()[:1])
    whole = stand_in.generate(PROMPTS, NEGATIVE, **kw)
    np.testing.assert_allclose(stand_in.generate(PROMPTS, NEGATIVE, batch_size=2, **kw),
                               whole, atol=1e-6)
    assert np.abs(whole[:3] - whole[3:]).max() > 1e-3  # prompt-major rows
    w1 = stand_in.generate(PROMPTS, NEGATIVE, guidance=1.0, **kw)
    np.testing.assert_allclose(stand_in.generate(PROMPTS, None, guidance=1.0, **kw), w1,
                               atol=1e-6)
    assert np.abs(stand_in.generate(PROMPTS, None, **kw) - whole).max() > 1e-3


# SD 1.5's scheduler_config.json as published (a PNDM file, no timestep_spacing).
SD15_SCHEDULER = dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear",
                      beta_start=0.00085, clip_sample=False, num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      trained_betas=None)


def test_scheduler_options_follow_from_config():
    """Each sampler takes its diffusers class's defaults for keys the file lacks."""
    s = sched.schedule_from_config(SD15_SCHEDULER)
    ddim = sched.setup(SD15_SCHEDULER, s, "ddim")
    assert ddim.options == dict(spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                eta=0.0) and ddim.clip_x0 is None and ddim.round_timesteps
    dpm = sched.setup(SD15_SCHEDULER, s, "dpmpp_2m", karras=False)
    assert dpm.options["skip_type"] == "linspace" and "steps_offset" not in dpm.options
    assert dpm.options["final_step"] == "zero" and dpm.options["lower_order_final_below"] == 15
    karras = sched.setup(SD15_SCHEDULER, s, "dpmpp_2m")  # None: Karras where there is one
    assert karras.options["skip_type"] == "karras" and karras.round_timesteps
    np.testing.assert_allclose(karras.options["sigma_max"], 14.6146, rtol=1e-4)
    euler = sched.setup(SD15_SCHEDULER, s, "euler", karras=False)
    assert euler.options == dict(sigma_schedule="timesteps", spacing="linspace",
                                 fractional_timesteps=True, init_noise="sigma_max")
    assert not euler.round_timesteps
    plms = sched.setup(SD15_SCHEDULER, s, "plms")
    assert plms.options["warmup"] == "pseudo_euler" and plms.options["steps_offset"] == 1
    assert sched.setup(SD15_SCHEDULER, s, "dpm_solver_2") == ({}, None, False)
    # A DDIM file without clip_sample gets DDIMScheduler's default: x0 clipped to [-1, 1].
    assert sched.setup({}, s, "ddim").clip_x0 == 1.0
    # steps_offset is diffusers' for leading spacing only.
    trailing = dict(SD15_SCHEDULER, timestep_spacing="trailing")
    assert "steps_offset" not in sched.setup(trailing, s, "ddim").options
    for name in samplers.SAMPLERS:
        samplers.check_options(name, sched.setup(SD15_SCHEDULER, s, name).options)


@pytest.mark.parametrize("config", [
    dict(BETAS), dict(BETAS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      num_train_timesteps=500),
    dict(BETAS, rescale_betas_zero_snr=True)], ids=["scaled_linear", "linear", "ztsnr"])
def test_schedule_is_diffusers_alphas_cumprod(config):
    ours = sched.schedule_from_config(config)
    ref = diffusers.DDIMScheduler(**config).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours.alpha_bar_table, ref, rtol=1e-5, atol=1e-7)
    assert sched.prediction_type(dict(prediction_type="v_prediction")) == "v"


def test_bad_inputs_are_named(sd1, tmp_path):
    s = sd1.schedule
    with pytest.raises(ValueError, match="no Karras grid"):
        sched.setup(SD15_SCHEDULER, s, "ddim", karras=True)
    with pytest.raises(ValueError, match="only ddim take eta"):
        sched.setup(SD15_SCHEDULER, s, "dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match="thresholding"):
        sched.schedule_from_config(dict(thresholding=True))
    with pytest.raises(ValueError, match="prediction_type"):
        sched.prediction_type(dict(prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match="multiples of 4"):
        sd1.sample(PROMPTS, height=30, width=16)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        sd1.sample(PROMPTS, ["a", "b", "c"], height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match=r"latents must be \[2, 16, 8, 4\]"):
        sd1.sample(PROMPTS, latents=np.zeros((2, 8, 16, 4)), height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="has no option"):
        sd1.sample(PROMPTS, sampler="ddim", final_step="zero", height=HEIGHT, width=WIDTH)
    with pytest.raises(ValueError, match="num must be"):
        sd1.sample(PROMPTS, num=0)
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder/, vae/, tokenizer/"):
        load_stable_diffusion(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        load_stable_diffusion(tmp_path)


def test_launch_sample_mode_writes_the_images(sd1, tmp_path):
    """`launch.py --mode sample` with configs/sd_text_to_image.py and pretrained.path:
    the npz (arr_0 uint8, arr_1 prompt index), the grid and the settings, with the
    images the library call gives for the same settings."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    env = dict(with_devices(1), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "launch.py", "--config", "configs/sd_text_to_image.py:runlocal",
         "--workdir", str(tmp_path / "run"), "--mode", "sample",
         f"--config.pretrained.path={sd1.path}", f"--config.sample.prompts_file={prompts}",
         f"--config.sample.negative_prompt={NEGATIVE[0]}", "--config.data.image_size=16",
         "--config.sample.seed=5"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    stem = tmp_path / "run" / "samples_sd_dpmpp_2m_2steps_seed5"
    with np.load(f"{stem}.npz") as f:
        arr, labels = f["arr_0"], f["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(labels, [0, 1])
    assert (tmp_path / "run" / f"{stem.name}.png").is_file()
    settings = json.loads((tmp_path / "run" / f"{stem.name}.json").read_text())
    assert settings["prompts"] == PROMPTS and settings["options"] == {}
    ref = sd1.sample(PROMPTS, NEGATIVE[0], sampler="dpmpp_2m", karras=True, steps=2,
                     guidance=7.5, seed=5, height=16, width=16, batch_size=1,
                     devices=jax.devices()[:1])
    assert np.abs(arr.astype(int) - ref.astype(int)).max() <= 1
    # Training a pretrained pipeline is refused, naming the flag to use: launch.py's
    # main on those flags, in this process (a second launch cost ~5 s).
    import logging
    from unittest import mock

    import launch
    from absl import app, flags
    from absl.testing import flagsaver
    argv = ["launch.py", "--config", "configs/sd_text_to_image.py:runlocal",
            "--workdir", str(tmp_path / "run"), f"--config.pretrained.path={sd1.path}"]
    # ml_collections reads the --config.* overrides from sys.argv; main sets two loggers'
    # levels, put back after it.
    loggers = [logging.getLogger(), logging.getLogger("diffusion")]
    levels = [lg.level for lg in loggers]
    try:
        with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
            flags.FLAGS(argv)
            with pytest.raises(app.UsageError, match="run it with --mode sample"):
                launch.main(["launch.py"])
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prompts_come_from_the_config(tmp_path):
    from configs.sd_text_to_image import get_config
    from diffusion.stable_diffusion.run import ConfigValueError, read_prompts
    c = get_config("runlocal")
    with pytest.raises(ConfigValueError, match="sample.prompt or sample.prompts_file"):
        read_prompts(c.sample)
    c.sample.prompt = "a cat"
    assert read_prompts(c.sample) == ["a cat"]
    (tmp_path / "p.txt").write_text("one\n  two  \n\n")
    c.sample.prompts_file = str(tmp_path / "p.txt")
    with pytest.raises(ConfigValueError, match="not both"):
        read_prompts(c.sample)
    c.sample.prompt = ""
    assert read_prompts(c.sample) == ["one", "two"]
