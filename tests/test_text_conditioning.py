"""Training and sampling with text prompts: caption dropout, a frozen encoder, prompt
parsing, and a tiny text run (configs/text_fashion_mnist.py:runlocal on a fixture
Fashion-MNIST) that trains, resumes exactly, and samples prompts through
`diffusion.load`, `--mode sample` and the text-to-image experiment."""
import csv
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

import diffusion
from configs.text_fashion_mnist import get_config
from diffusion import data
from diffusion.config_file import ConfigError
from diffusion.data import captions
from diffusion.models import text_conditional
from diffusion.text import prompts as text_prompts
from diffusion.train import loop, text_encoder
from diffusion.train.generate import sample_from_workdir
from diffusion.train.setup import build_run
from diffusion.train_state import drop_labels, make_optimizer
from experiments.text_to_image import prompts as study_prompts
from experiments.text_to_image import run as study

from param_noise import perturbed


PROMPTS = ["a photo of a sneaker", "a photo of a bag"]


# ---- caption dropout, frozen encoder, prompts: no network ------------------------------

def test_caption_dropout_replaces_exactly_the_chosen_rows_with_the_empty_prompt():
    tokens = jnp.arange(16 * 77, dtype=jnp.int32).reshape(16, 77) % 600
    null = jnp.asarray(captions.demo_tokenizer()("").input_ids[0])
    key = jax.random.key(3)
    out = np.asarray(drop_labels(key, tokens, 0.5, null))
    chosen = np.asarray(jax.random.uniform(key, (16,)) < 0.5)
    assert 0 < chosen.sum() < 16
    np.testing.assert_array_equal(out[chosen], np.broadcast_to(null, (chosen.sum(), 77)))
    np.testing.assert_array_equal(out[~chosen], np.asarray(tokens)[~chosen])
    np.testing.assert_array_equal(out, drop_labels(key, tokens, 0.5, null))  # deterministic
    assert not np.array_equal(out, drop_labels(jax.random.key(4), tokens, 0.5, null))
    # Labels drop the same rows for the same key, to the null label -1.
    labels = np.asarray(drop_labels(key, jnp.arange(16), 0.5))
    np.testing.assert_array_equal(labels == -1, chosen)
    assert drop_labels(key, tokens, 0.0, null) is tokens


@pytest.mark.parametrize("flatten", [False, True])
def test_frozen_subtree_moves_neither_by_gradient_nor_by_weight_decay(flatten):
    optim = get_config().optim
    optim.weight_decay, optim.warmup_steps, optim.flatten = 0.1, 0, flatten
    tx, _ = make_optimizer(optim, 10, frozen=("text",))
    params = {"denoiser": {"w": jnp.ones(3)}, "text": {"w": jnp.ones(3)}}
    grads = {"denoiser": {"w": jnp.ones(3)}, "text": {"w": jnp.ones(3)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["text"]["w"], params["text"]["w"])
    assert np.all(np.asarray(new["denoiser"]["w"]) < 1.0)
    c = get_config("runlocal")
    assert text_conditional.frozen_subtrees(c.model) == ()
    c.model.text.train_encoder = False
    assert text_conditional.frozen_subtrees(c.model) == ("text",)


def test_prompts_from_strings_files_and_negatives(tmp_path):
    assert text_prompts.prompts_from("a bag | a dark sneaker") == ["a bag", "a dark sneaker"]
    assert text_prompts.prompts_from("") == []
    path = tmp_path / "prompts.txt"
    path.write_text("a bag\n\n a coat \n")
    assert text_prompts.prompts_from(prompts_file=str(path)) == ["a bag", "a coat"]
    with pytest.raises(ValueError, match="either sample.prompt or sample.prompts_file"):
        text_prompts.prompts_from("a bag", str(path))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        text_prompts.prompts_from(prompts_file=str(tmp_path / "nope.txt"))
    assert text_prompts.negatives_for(None, 2) == ["", ""]
    assert text_prompts.negatives_for("sneaker", 2) == ["sneaker", "sneaker"]
    assert text_prompts.negatives_for("x|y", 2) == ["x", "y"]
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        text_prompts.negatives_for(["x", "y", "z"], 2)
    tok = captions.demo_tokenizer()
    pairs = text_prompts.prompt_pairs(tok, PROMPTS, ["", "sneaker"])
    assert pairs.shape == (2, 2, 77) and pairs.dtype == np.int32
    np.testing.assert_array_equal(pairs[1, 1], tok("sneaker").input_ids[0])
    np.testing.assert_array_equal(pairs[0, 1], tok("").input_ids[0])


def test_study_scores_the_classes_a_prompt_names():
    assert study_prompts.named_classes("a photo of a t-shirt") == {0}
    assert study_prompts.named_classes("a photo of a shirt") == {6}
    assert study_prompts.named_classes("a photo of an ankle boot") == {9}
    assert study_prompts.target_classes("footwear") == {5, 7, 9}
    assert study_prompts.target_classes("footwear", "sneaker") == {5, 9}
    assert study_prompts.tone_prompts(7) == ("a photo of a dark sneaker",
                                             "a photo of a light sneaker")


def test_build_model_gives_unet_and_dit_a_text_encoder_of_the_configured_width():
    from diffusion.models import DiT, UNet, build_model, init_params
    c = get_config("runlocal").model
    for name, kind in (("unet", UNet), ("dit", DiT)):
        c.name = name
        model = build_model(c, (8, 8, 1), 0)
        assert isinstance(model, text_conditional.TextConditional)
        assert isinstance(model.denoiser, kind) and model.denoiser.context_dim == 16
        assert model.text_config.vocab_size == captions.demo_tokenizer().vocab_size
        shapes = jax.eval_shape(lambda k: init_params(model, k, (8, 8, 1), 0),
                                jax.random.key(0))
        assert set(shapes) == {"denoiser", "text"}
        assert shapes["text"]["embeddings"]["token_embedding"]["embedding"].shape == (637, 16)
    with pytest.raises(ValueError, match="conditions on captions alone"):
        build_model(c, (8, 8, 1), 10)


# ---- a tiny text run --------------------------------------------------------------------

def _square(level: int, side: int) -> np.ndarray:
    image = np.zeros((28, 28), np.uint8)
    top = (28 - side) // 2
    image[top:top + side, top:top + side] = level
    return image


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    """IDX files like Fashion-MNIST's: 40 train and 20 test images of squares."""
    root = tmp_path_factory.mktemp("fmnist")
    combos = [(100, 10), (100, 24), (250, 10), (250, 24)]
    for prefix, n in (("train", 40), ("t10k", 20)):
        images = np.stack([_square(*combos[(i // 10) % 4]) for i in range(n)])
        data.write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        data.write_idx(root / f"{prefix}-labels-idx1-ubyte.gz",
                       (np.arange(n) % 10).astype(np.uint8))
    return str(root)


def _config(fmnist_dir):
    c = get_config("runlocal")
    c.data.data_dir = fmnist_dir
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_dir):
    workdir = str(tmp_path_factory.mktemp("text_run") / "run")
    loop.train_and_evaluate(_config(fmnist_dir), workdir)
    return workdir


def test_text_run_trains_writes_one_grid_row_per_prompt_and_resumes_exactly(
        trained, fmnist_dir, tmp_path):
    full = trained
    assert sorted(int(d) for d in os.listdir(os.path.join(full, "checkpoints"))
                  if d.isdigit()) == [2, 4]
    grid = np.asarray(Image.open(os.path.join(full, "samples", "samples_ema_0000004.png")))
    assert grid.shape[:2] == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # 2 prompts x 2 samples
    with open(os.path.join(full, "metrics.jsonl")) as f:
        expected = {r["step"]: r["loss"] for r in map(json.loads, f)}
    cut = str(tmp_path / "cut")
    shutil.copytree(full, cut)
    shutil.rmtree(os.path.join(cut, "checkpoints", "4"))
    os.remove(os.path.join(cut, "metrics.jsonl"))
    c = _config(fmnist_dir)
    c.train.sample_every = 0
    resumed = loop.train_and_evaluate(c, cut)
    assert resumed["step"] == 4
    assert resumed["loss"] == pytest.approx(expected[4], rel=1e-6)


def test_text_run_needs_captions_and_the_diffusion_objective(tmp_path, fmnist_dir):
    c = _config(fmnist_dir)
    c.data.source = "fashion_mnist_idx"
    with pytest.raises(ConfigError, match="needs a captioned data source"):
        build_run(c, str(tmp_path / "a"))
    c = _config(fmnist_dir)
    c.train.objective = "edm"
    with pytest.raises(ConfigError, match="does not train text-conditional models"):
        build_run(c, str(tmp_path / "b"))
    c = _config(fmnist_dir)
    c.model.text.cache_embeddings = True  # with a trained encoder
    with pytest.raises(ConfigError, match="cache_embeddings=True needs a frozen encoder"):
        build_run(c, str(tmp_path / "c"))


def _pretrained_pipeline_folder(root) -> tuple[str, dict]:
    """An SD-style folder with tokenizer/ (the demo vocabulary) and text_encoder/ (a
    random transformers CLIPTextModel of another width than the config's), and the
    encoder's weights converted to our layout."""
    import torch
    import transformers
    from diffusion.convert.clip_text import load_clip_text
    from diffusion.text.learn_bpe import write_vocabulary
    tok = captions.demo_tokenizer()
    write_vocabulary(root / "tokenizer", captions.demo_merges())
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=24, intermediate_size=48,
        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
        eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.eos_id)
    transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return str(root), load_clip_text(root)[1]


def test_pretrained_frozen_encoder_trains_alike_from_tokens_and_from_its_cache(
        tmp_path, fmnist_dir):
    folder, weights = _pretrained_pipeline_folder(tmp_path / "sd")

    def start(cache: bool, workdir: str):
        c = _config(fmnist_dir)
        c.model.text.update(pretrained=folder, train_encoder=False, cache_embeddings=cache)
        run = build_run(c, workdir)
        state, _ = loop.restore_or_init(run)
        return text_encoder.with_cached_captions(run, state), state

    run_t, state_t = start(False, str(tmp_path / "tokens"))
    run_c, state_c = start(True, str(tmp_path / "cached"))
    assert run_t.model.denoiser.context_dim == 24  # the encoder's width, not text.width
    for tree in (state_c.params["text"], state_c.ema_params["text"]):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree), weights)
    cache = np.load(tmp_path / "cached" / "text_cache" / "embeddings.npy")
    tokens = run_c.source.caption_tokens
    assert cache.shape == tokens.shape + (24,)
    np.testing.assert_allclose(cache, text_encoder.encode_captions(
        run_c.model, weights, tokens), atol=1e-6)
    # The same batch, as token ids and as cached embeddings: the same step.
    batch_t = next(iter(data.BatchIterator(run_t.source, 8, seed=0)))
    batch_c = next(iter(data.BatchIterator(run_c.source, 8, seed=0)))
    assert "tokens" in batch_t and "context" in batch_c and "tokens" not in batch_c
    outs = [jax.jit(loop._step_fn(r))(s, b)
            for r, s, b in ((run_t, state_t, batch_t), (run_c, state_c, batch_c))]
    assert float(outs[0][1]["loss"]) == pytest.approx(float(outs[1][1]["loss"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 outs[0][0].params, outs[1][0].params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(outs[1][0].params["text"]),
                 weights)  # frozen
    # A second start reads the cache; another encoder re-encodes it.
    stamp = os.path.getmtime(tmp_path / "cached" / "text_cache" / "embeddings.npy")
    again = text_encoder.with_cached_captions(run_c, state_c)
    assert isinstance(again.source.embeddings, np.memmap)
    assert os.path.getmtime(tmp_path / "cached" / "text_cache" / "embeddings.npy") == stamp
    other = state_c.replace(params=dict(state_c.params, text=jax.tree.map(
        lambda a: a + 1.0, state_c.params["text"])))
    redone = text_encoder.with_cached_captions(run_c, other)
    assert not np.allclose(np.asarray(redone.source.embeddings), cache)


def _sample(pipe, **kw):
    kw = dict(dict(num=2, prompt=PROMPTS, guidance=3.0, seed=1), **kw)
    return pipe.sample("ddim", 2, **kw)


def test_load_samples_prompts_alike_on_one_and_eight_devices(trained):
    x8 = _sample(diffusion.load(trained), negative_prompt="a bag")
    x1 = _sample(diffusion.load(trained, devices=jax.devices()[:1]), negative_prompt="a bag")
    assert x8.shape == (4, 8, 8, 1) and np.all(np.abs(x8) <= 1)
    np.testing.assert_allclose(x8, x1, atol=1e-5)
    with pytest.raises(ValueError, match="labels need a class-conditional run"):
        diffusion.load(trained).sample("ddim", 2, num=2, labels=[0, 1])


def test_negative_prompt_is_the_unconditional_branch_and_w1_ignores_it(trained):
    pipe = diffusion.load(trained)
    # After 4 steps the zero-initialised cross-attention outputs are still ~0: perturb
    # every parameter so that the prompts matter to the network.
    pipe = dataclasses.replace(pipe, params=perturbed(pipe.params, 0.1, seed=0), _fns={})
    plain = _sample(pipe)
    negative = _sample(pipe, negative_prompt="a photo of a sneaker")
    assert np.abs(plain - negative).max() > 1e-3
    # The empty negative prompt is the default unconditional branch.
    np.testing.assert_array_equal(plain, _sample(pipe, negative_prompt=""))
    # w = 1: the conditional pass alone, whatever the negative prompt.
    np.testing.assert_array_equal(_sample(pipe, guidance=1.0),
                                  _sample(pipe, guidance=1.0, negative_prompt="a bag"))
    assert not np.array_equal(_sample(pipe, guidance=1.0), plain)


def test_sample_mode_writes_one_row_per_prompt(trained, fmnist_dir):
    c = _config(fmnist_dir)
    c.sample.update(prompt="|".join(PROMPTS), negative_prompt="a bag", num_samples=2,
                    num_steps=2, guidance_scale=3.0)
    path = sample_from_workdir(c, trained, overrides=["sample.prompt"])
    x = np.load(path)["arr_0"]
    assert x.shape == (4, 8, 8, 1) and x.dtype == np.uint8
    grid = np.asarray(Image.open(path[:-4] + ".png"))
    assert grid.shape[:2] == (2 * 8 + 3 * 2, 2 * 8 + 3 * 2)  # a row per prompt
    with open(path[:-4] + ".prompts.txt") as f:
        assert f.read().splitlines() == [f"{p}\ta bag" for p in PROMPTS]
    pipe = diffusion.load(trained)  # the same images as the library call
    x_lib = pipe.sample("ddim", 2, num=2, prompt=PROMPTS, negative_prompt="a bag",
                        guidance=3.0, seed=0)
    np.testing.assert_array_equal(x, np.round((x_lib + 1) * 127.5).astype(np.uint8))


def test_text_to_image_study_runs_end_to_end(trained, fmnist_dir, tmp_path):
    out = str(tmp_path / "study")
    result = study.main(["run", f"--workdir={trained}", f"--out={out}", "--num=2",
                         "--sweep=1,3", "--tone_classes=7", "--steps=2", "--batch_size=8",
                         "--bootstrap=20", f"--reference_dir={fmnist_dir}"])
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["prompt", "negative_prompt", "guidance", "num_samples",
                       "class_accuracy", "acc_lo", "acc_hi", "mean_brightness", "fid",
                       "fid_lo", "fid_hi"]
    assert len(rows) == 1 + 2 * 11 + 2 + 2  # 2 weights x (10 + pooled), tone, footwear
    pooled = [r for r in rows[1:] if r[0] == study_prompts.ALL_CLASSES]
    assert [r[2] for r in pooled] == ["1.0", "3.0"]
    assert all(0 <= float(r[9]) <= float(r[8]) <= float(r[10]) for r in pooled)
    assert ["footwear", "sneaker", "3.0", "2"] == [r for r in rows if r[1] == "sneaker"][0][:4]
    for r in rows[1:]:
        assert 0 <= float(r[5]) <= float(r[4]) <= float(r[6]) <= 1
    assert set(result["sneakers"]) == {"", "sneaker"}
    md = open(os.path.join(out, "results.md")).read()
    assert "## Guidance sweep" in md and "n = 2 samples per prompt" in md
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
    assert grid.shape[0] == 14 * 8 + 15 * 2  # 10 class + 2 tone + 2 footwear rows
    # A second run reads each weight's samples from the cache: the same table.
    assert len(os.listdir(os.path.join(out, "cache"))) == 2
    again = study.main(["run", f"--workdir={trained}", f"--out={out}", "--num=2",
                        "--sweep=1,3", "--tone_classes=7", "--steps=2", "--batch_size=8",
                        "--bootstrap=20", f"--reference_dir={fmnist_dir}"])
    assert again["rows"] == result["rows"]
