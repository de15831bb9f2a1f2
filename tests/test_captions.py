"""Captions from facts of each Fashion-MNIST image: the demo's BPE vocabulary, the pixel
attributes, the deterministic caption draws, the captioned source through BatchIterator
(resume, processes, 1 vs 8 devices) and the prompt-evaluation helpers."""
import collections
import json
import os

import jax
import numpy as np
import pytest

from diffusion import data, parallel
from diffusion.data import captioned, captions
from diffusion.evaluation import prompts
from diffusion.text import learn_bpe as bpe
from diffusion.text import vocab as vocab_tool
from diffusion.text.tokenizer import BOS, END_OF_WORD, EOS, load_clip_tokenizer, pre_tokenize

DARK, LIGHT = 100, 250      # foreground levels: below / above every class's median tone
SMALL, LARGE = 10, 24       # square sides: 100 / 576 of 784 pixels, below / above every median


def _square(level: int, side: int) -> np.ndarray:
    image = np.zeros((28, 28), np.uint8)
    top = (28 - side) // 2
    image[top:top + side, top:top + side] = level
    return image


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """An IDX directory like Fashion-MNIST's: 40 images, each class with the four
    (tone, size) combinations; example i has class i % 10, combination i // 10."""
    root = tmp_path_factory.mktemp("fmnist")
    combos = [(DARK, SMALL), (DARK, LARGE), (LIGHT, SMALL), (LIGHT, LARGE)]
    images = np.stack([_square(*combos[i // 10]) for i in range(40)])
    labels = (np.arange(40) % 10).astype(np.uint8)
    data.write_idx(root / "train-images-idx3-ubyte.gz", images)
    data.write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    return str(root)


@pytest.fixture(scope="module")
def source(tiny_dir):
    return data.make_source("fashion_mnist_captions", data_dir=tiny_dir)


# ---- the vocabulary -------------------------------------------------------------------

def test_learn_bpe_merges_the_most_frequent_pair_first():
    # pieces aab x2, ab x1: (a, b</w>) occurs 3 times, (a, a) twice
    assert bpe.learn_bpe(["aab aab ab"]) == [("a", "b</w>"), ("a", "ab</w>")]
    # a tie goes to the smaller pair, whatever the corpus order
    assert bpe.learn_bpe(["cd ab"]) == bpe.learn_bpe(["ab", "cd"]) == [
        ("a", "b</w>"), ("c", "d</w>")]
    assert bpe.learn_bpe(["abc abc"], max_merges=1) == [("a", "b")]  # ties with (b, c</w>)
    vocab = bpe.clip_vocabulary([("a", "b</w>")])
    assert len(vocab) == 512 + 1 + 2 and vocab["ab</w>"] == 512
    assert vocab[BOS] == 513 and vocab[EOS] == 514  # eos: the largest id, as in CLIP


def test_every_caption_word_is_one_token_of_the_demo_vocabulary():
    tok = captions.demo_tokenizer()
    assert 512 < tok.vocab_size <= 1000 and tok.eos_id == tok.vocab_size - 1
    id_to_token = {i: t for t, i in tok.vocab.items()}
    texts = captions.all_captions()
    assert len(texts) == len(set(texts)) and texts[-1] == ""
    for text in texts:
        pieces = pre_tokenize(text)
        ids = tok.encode(text)
        assert [id_to_token[i] for i in ids] == [p + END_OF_WORD for p in pieces], text
    rows = tok(texts).input_ids
    assert rows.shape == (len(texts), 77) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows[-1, :3], [tok.bos_id, tok.eos_id, tok.eos_id])
    # text outside the corpus still tokenizes (byte fallback), with no unknown symbol
    ids = tok.encode("Zebra-print 42 ☃")
    assert ids and all(id_to_token[i] not in (BOS, EOS) for i in ids)


def test_vocab_build_is_deterministic_and_the_cli_writes_what_the_source_uses(tmp_path):
    corpus = captions.all_captions()
    assert bpe.learn_bpe(corpus) == bpe.learn_bpe(corpus[::-1]) == list(captions.demo_merges())
    out = vocab_tool.main(["vocab", "--out", str(tmp_path / "a")])
    vocab_tool.main(["vocab", "--out", str(tmp_path / "b")])
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert out["vocab_size"] == captions.demo_tokenizer().vocab_size
    loaded = load_clip_tokenizer(tmp_path / "a")
    texts = corpus + ["a photo of a Zebra, 42!", "footwear"]
    np.testing.assert_array_equal(loaded(texts).input_ids,
                                  captions.demo_tokenizer()(texts).input_ids)
    with open(tmp_path / "a" / "merges.txt") as fh:
        assert fh.readline().startswith("#version")
    assert json.loads((tmp_path / "a" / "vocab.json").read_text())[EOS] == out["vocab_size"] - 1
    # a corpus file and a merge budget
    (tmp_path / "corpus.txt").write_text("red shoe\nred shoes\n")
    small = vocab_tool.main(["vocab", "--out", str(tmp_path / "c"), "--corpus",
                             str(tmp_path / "corpus.txt"), "--max_merges", "3"])
    assert small == dict(out=str(tmp_path / "c"), vocab_size=512 + 3 + 2, num_merges=3)


def test_transformers_reads_the_demo_vocabulary_alike(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab_tool.main(["vocab", "--out", str(tmp_path)])
    theirs = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    texts = captions.all_captions()[::7] + ["a photo of a Zebra, 42!"]
    ours = load_clip_tokenizer(tmp_path)(texts).input_ids
    np.testing.assert_array_equal(
        ours, theirs(texts, padding="max_length", max_length=77, truncation=True)["input_ids"])


# ---- attributes and captions ----------------------------------------------------------

def test_attributes_agree_with_the_pixels():
    images = np.stack([_square(DARK, SMALL), _square(LIGHT, LARGE), np.zeros((28, 28),
                                                                              np.uint8)])[..., None]
    brightness, area = captions.measure_attributes(images)
    np.testing.assert_allclose(brightness, [DARK / 255, LIGHT / 255, 0])
    np.testing.assert_allclose(area, [100 / 784, 576 / 784, 0])
    # the same images as model outputs in [-1, 1], and in three equal channels
    as_model = np.repeat(images / 127.5 - 1, 3, axis=-1)
    for got, want in zip(captions.measure_attributes(as_model, (-1, 1)), (brightness, area)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # a faint haze below the foreground level changes nothing
    hazy = images + np.uint8(captions.FOREGROUND_LEVEL - 1) * (images == 0)
    np.testing.assert_allclose(captions.measure_attributes(hazy)[0], brightness)
    light, large = captions.attribute_bits(images[:2], np.array([7, 7]))
    np.testing.assert_array_equal(light, [False, True])
    np.testing.assert_array_equal(large, [False, True])
    # thresholds are the class medians: half of each class above
    labels = np.array([0, 0, 1, 1, 1])
    imgs = np.stack([_square(v, s) for v, s in [(60, 4), (200, 20), (50, 6), (90, 8),
                                                 (130, 10)]])[..., None]
    th = captions.measure_thresholds(imgs, labels, 2)
    np.testing.assert_allclose(th.brightness, [130 / 255, 90 / 255])
    np.testing.assert_allclose(th.area, [(16 + 400) / 2 / 784, 64 / 784])
    with pytest.raises(ValueError, match=r"classes \[2\] have no examples"):
        captions.measure_thresholds(imgs, labels, 3)
    with pytest.raises(ValueError, match="value_range"):
        captions.measure_attributes(images, (1, 1))
    with pytest.raises(ValueError, match="outside the 10 classes"):
        captions.attribute_bits(images[:1], np.array([10]))


def test_stored_thresholds_are_the_train_split_medians():
    if not os.path.isdir(data.FASHION_MNIST_DIR):
        pytest.fail(f"{data.FASHION_MNIST_DIR} is missing; install it with: "
                    f"{data.FASHION_MNIST_APT}")
    train = data.make_source("fashion_mnist_idx")
    th = captions.measure_thresholds(train.images, train.labels, 10)
    np.testing.assert_allclose(th.brightness, captions.FASHION_MNIST_THRESHOLDS.brightness,
                               atol=1e-8)
    np.testing.assert_allclose(th.area, captions.FASHION_MNIST_THRESHOLDS.area, atol=1e-8)
    light, large = captions.attribute_bits(train.images, train.labels)
    for k in range(10):
        assert abs(light[train.labels == k].mean() - 0.5) < 0.01
        assert abs(large[train.labels == k].mean() - 0.5) < 0.01


def test_captions_read_well():
    assert captions.class_prompt(7) == "a photo of a sneaker"
    assert captions.class_prompt(9) == "a photo of an ankle boot"
    assert captions.class_prompt(1) == "a photo of a pair of trousers"
    assert captions.caption(7, 3, 1, False, True) == "a dark trainer"
    assert captions.caption(8, 4, 0, True, False) == "a small bag"
    assert captions.caption(9, 3, 1, True, True) == "a light boot"
    assert captions.caption(4, 6, 1, True, True) == "a photo of a large light jacket"
    assert captions.caption(7, 8, 0, False, False) == "dark footwear"
    assert captions.caption(7, 7, 0, False, False) == "footwear"
    assert all(len(names) <= 3 for names, _ in captions.CLASS_WORDS)  # draws are mod 6
    assert len(captions.CLASS_WORDS) == len(data.FASHION_MNIST_CLASSES)


def test_caption_draws_are_deterministic_and_change_with_seed_and_epoch():
    idx = np.arange(3000)
    a = captions.caption_draws(idx, 0, seed=0)
    for x, y in zip(a, captions.caption_draws(idx, np.zeros(3000, int), seed=0)):
        np.testing.assert_array_equal(x, y)
    for other in (captions.caption_draws(idx, 0, seed=1), captions.caption_draws(idx, 1, 0)):
        assert 0.8 < np.mean(a[0] != other[0]) < 0.95  # independent draws: 10/11 differ
    counts = np.bincount(a[0], minlength=len(captions.TEMPLATES)) / len(idx)
    assert counts.min() > 0.06 and counts.max() < 0.12  # ~uniform, 1/11 each
    assert set(np.unique(a[1])) == set(range(6))
    with pytest.raises(ValueError, match="non-negative"):
        captions.caption_draws(np.array([-1]), 0, 0)


def test_source_captions_state_the_facts(source):
    assert isinstance(source, captioned.CaptionedSource) and len(source) == 40
    np.testing.assert_array_equal(source.light, np.arange(40) >= 20)
    np.testing.assert_array_equal(source.large, np.arange(40) % 20 >= 10)
    seen = collections.Counter()
    for epoch in range(5):
        texts = source.caption_texts(np.arange(40), np.full(40, epoch), seed=3)
        for i, text in enumerate(texts):
            names, group = captions.CLASS_WORDS[i % 10]
            words = text.split()
            assert any(n in text for n in names) or group in words, text
            assert ("light" in words, "dark" in words) in ((False, False),
                                                          (source.light[i], not source.light[i]))
            assert ("large" in words, "small" in words) in ((False, False),
                                                           (source.large[i], not source.large[i]))
            seen[text] += 1
    assert len(seen) > 100  # the templates, names and attributes all vary
    rows = source.conditioning(np.arange(40), np.zeros(40, int), 3)["tokens"]
    np.testing.assert_array_equal(
        rows, source.tokenizer(source.caption_texts(np.arange(40), np.zeros(40), 3)).input_ids)
    assert source.null_tokens[0] == source.tokenizer.bos_id
    assert source.null_tokens[1] == source.eos_token_id == source.vocab_size - 1
    with pytest.raises(IndexError, match="outside"):
        source.conditioning(np.array([40]), np.array([0]), 0)


# ---- the captioned source through BatchIterator ---------------------------------------

def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() == {"image", "label", "tokens"}
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_carry_tokens_that_resume_and_split_like_the_images(source):
    kw = dict(seed=3, random_flip=True)
    ref = _batches(data.BatchIterator(source, 8, **kw), 12)  # 2.4 epochs of 40
    assert ref[0]["tokens"].shape == (8, 77) and ref[0]["tokens"].dtype == np.int32
    _assert_same(ref, _batches(data.BatchIterator(source, 8, **kw), 12))
    _assert_same(ref[7:], _batches(data.BatchIterator(source, 8, start_step=7, **kw), 5))
    prefetched = data.BatchIterator(source, 8, start_step=2, prefetch=2, **kw)
    _assert_same(ref[2:], _batches(prefetched, 10))
    prefetched.close()
    parts = [_batches(data.BatchIterator(source, 8, process_index=p, process_count=2, **kw),
                      12) for p in range(2)]
    for k in range(12):
        for key in ("image", "label", "tokens"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][k][key], parts[1][k][key]]), ref[k][key])
    # each batch's tokens are the captions of its examples in their epochs
    it = data.BatchIterator(source, 8, **kw)
    for k in (0, 4, 5, 11):
        epochs = (8 * k + np.arange(8)) // 40  # stream positions -> epochs of 40 examples
        np.testing.assert_array_equal(it.epochs_at(k), epochs)
        texts = source.caption_texts(it.indices_at(k), epochs, 3)
        np.testing.assert_array_equal(ref[k]["tokens"], source.tokenizer(texts).input_ids)
    # an example's caption changes between epochs; another seed draws other captions
    by_epoch = [source.conditioning(np.arange(40), np.full(40, e), 3)["tokens"]
                for e in range(2)]
    assert not np.array_equal(*by_epoch)
    other = _batches(data.BatchIterator(source, 8, seed=4, random_flip=True), 1)[0]
    same_examples = data.BatchIterator(source, 8, seed=4).indices_at(0)
    assert not np.array_equal(
        other["tokens"], source.conditioning(same_examples, np.zeros(8, int), 3)["tokens"])
    # resized once up front, captions kept
    big = _batches(data.BatchIterator(source, 8, image_size=32, **kw), 3)
    assert big[0]["image"].shape == (8, 32, 32, 1)
    for x, y in zip(big, ref):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_batches_equal_on_1_and_8_devices(source):
    assert jax.device_count() == 8
    it = data.BatchIterator(source, 8, seed=1, random_flip=True)
    one = parallel.make_mesh(jax.devices()[:1])
    eight = parallel.make_mesh(jax.devices())
    for k in (0, 6):
        batch = it.batch_at(k)
        a, b = parallel.global_batch(batch, one), parallel.global_batch(batch, eight)
        assert len(b["tokens"].sharding.device_set) == 8
        for key in batch:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
            np.testing.assert_array_equal(np.asarray(b[key]), batch[key])


# ---- prompt evaluation ----------------------------------------------------------------

def test_shares_and_intervals():
    s = prompts.wilson_share(5, 10)
    assert s.value == 0.5 and s.n == 10
    np.testing.assert_allclose([s.lo, s.hi], [0.2366, 0.7634], atol=1e-4)
    zero = prompts.wilson_share(0, 10)
    assert zero.lo == 0 and 0.27 < zero.hi < 0.28
    m = prompts.mean_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose([m.value, m.hi - m.value], [2.5, 1.96 * np.std([1, 2, 3, 4],
                                                                               ddof=1) / 2],
                               rtol=1e-3)
    probs = np.eye(10)[[7, 7, 5, 7]]
    assert prompts.class_share(probs, 7).value == 0.75
    assert prompts.class_share(np.array([7, 1]), 7).value == 0.5
    with pytest.raises(ValueError, match="n > 0"):
        prompts.wilson_share(0, 0)


def test_attribute_summary_of_samples():
    dark = np.stack([_square(DARK, LARGE)] * 6)[..., None] / 127.5 - 1
    light = np.stack([_square(LIGHT, SMALL)] * 6)[..., None] / 127.5 - 1
    d, li = prompts.attribute_summary(dark, 7), prompts.attribute_summary(light, 7)
    assert d.light.value == 0 and li.light.value == 1
    assert d.large.value == 1 and li.large.value == 0
    np.testing.assert_allclose([d.brightness.value, li.brightness.value],
                               [DARK / 255, LIGHT / 255], atol=1e-6)
    assert d.brightness.hi < li.brightness.lo
