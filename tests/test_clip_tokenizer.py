"""Our CLIP tokenizer gives transformers' `CLIPTokenizer` ids on the same files.

The vocabulary is built here: the 256 byte characters and their `</w>` forms, merges
learned by a few rounds of BPE on a small corpus plus a few listed multi-byte ones
(accents, CJK, emoji bytes), and the two special tokens. transformers 5 has one
CLIPTokenizer (backed by `tokenizers`; CLIPTokenizerFast is the same class).
"""
import collections
import gzip
import json

import numpy as np
import pytest

from diffusion.text import tokenizer as tk

transformers = pytest.importorskip("transformers")

CORPUS = ("a photo of a cat sitting on the mat, the cat is there and that is that. "
          "a painting of the sea at night with stars; trending on artstation, highly "
          "detailed, 4k, photorealistic photograph of an astronaut riding a horse")
# Multi-byte characters whose first bytes merge (as byte characters), and a few more.
MULTI_BYTE = ("é", "東", "写", "🐱", "🚀")
LISTED_MERGES = [("'", "s</w>"), ("!", "!"), ("1", "2"), ("Ã", "©</w>")]
PROMPTS = [
    "a photo of a cat",
    "The Cat's hat, isn't it? They're here; we've 2 cats & I'm sure you'll see... he'd go!",
    "numbers 1234567, 3.14 and the 2nd of 10,000",
    "Café crème brûlée à la mode, naïve façade",
    "Cafe\u0301 decomposed e\u0301 accents",
    "東京の夜景 写真 astronaut",
    "🐱 cat 🚀🔥 emoji 👍🏽 with skin tone 😀😀",
    "   lots   of\t\twhitespace \n\n here\u00a0and\u3000there  ",
    "UPPER CASE TEXT, MiXeD cAsE",
    "ΟΔΟΣ Σίσυφος greek final sigma",
    "hello!!! ... ??? -- __init__ (x) [y] {z} @#$%^&*",
    "x's y'all '' ''s 'S 'RE 'll' 'd!",
    "special <|endoftext|> inside, <|startoftext|>x, <|ENDOFTEXT|> upper",
    "",
    "zero\u200bwidth and \x1c file separator and \x85 next line",
    "नमस्ते दुनिया combining marks",
    "a very long prompt that goes on " * 12,
]


def _learn_merges(corpus: str, rounds: int) -> list[tuple[str, str]]:
    """Plain BPE on the corpus' lower-cased words (ASCII: bytes are their own chars)."""
    words = collections.Counter(corpus.replace(",", " ").replace(".", " ").split())
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(rounds):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(splits[w], splits[w][1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, s in splits.items():
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            splits[w] = out
    return merges


def _byte_chars(text: str) -> list[str]:
    table = tk.bytes_to_unicode()
    return [table[b] for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def vocab_and_merges():
    chars = list(tk.bytes_to_unicode().values())
    merges = _learn_merges(CORPUS, 60) + LISTED_MERGES
    for text in MULTI_BYTE:  # a chain of merges over all but the last byte
        c = _byte_chars(text)
        merges += [("".join(c[:k]), c[k]) for k in range(1, len(c) - 1)
                   if ("".join(c[:k]), c[k]) not in merges]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def _write(folder, vocab, merges, config=None, special_map=None):
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


EOT = {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
       "rstrip": False, "single_word": False, "special": True}
VARIANTS = {
    # SD 1.x: pads with <|endoftext|>; no config file, so the length must be given.
    "sd1_no_config": (None, None, "<|endoftext|>"),
    # SD 2.x: the config says <|endoftext|>, special_tokens_map.json "!" wins (id 0).
    "sd2_special_map": ({"model_max_length": 77, "pad_token": "<|endoftext|>",
                         "tokenizer_class": "CLIPTokenizer"}, {"pad_token": "!"}, "!"),
    # A config saved with added_tokens_decoder: the special map is not read.
    "added_tokens_decoder": ({"model_max_length": 77, "pad_token": "<|endoftext|>",
                              "added_tokens_decoder": {"-1": EOT}}, {"pad_token": "!"},
                             "<|endoftext|>"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ids_equal_transformers(tmp_path, vocab_and_merges, variant):
    vocab, merges = vocab_and_merges
    config, special_map, pad = VARIANTS[variant]
    if config and "added_tokens_decoder" in config:
        config = {**config, "added_tokens_decoder": {str(vocab["<|endoftext|>"]): EOT}}
    folder = _write(tmp_path / variant, vocab, merges, config, special_map)
    ours = tk.load_clip_tokenizer(folder)
    theirs = transformers.CLIPTokenizer.from_pretrained(str(folder))
    assert ours.pad_token == theirs.pad_token == pad
    assert ours.pad_id == theirs.pad_token_id and ours.max_length == 77
    ref = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True)
    got = ours(PROMPTS)
    assert got.input_ids.dtype == np.int32 and got.input_ids.shape == (len(PROMPTS), 77)
    for text, a, b in zip(PROMPTS, got.input_ids, ref["input_ids"]):
        np.testing.assert_array_equal(a, b, err_msg=repr(text))
    np.testing.assert_array_equal(got.attention_mask, ref["attention_mask"])
    eos = np.asarray(ref["input_ids"]) == theirs.eos_token_id
    np.testing.assert_array_equal(got.eos_positions, eos.argmax(axis=1))
    assert got.input_ids[-1, -1] == ours.eos_id  # the long prompt was truncated
    assert len(ours.encode(PROMPTS[-1])) > 75
    # The vocabulary is exercised: merges fire, the emoji and CJK bytes merge.
    assert vocab["cat</w>"] in got.input_ids[0]
    assert vocab["".join(_byte_chars("🐱")[:3])] in got.input_ids[6]
    assert vocab["".join(_byte_chars("東")[:2])] in got.input_ids[5]


def test_bang_is_the_pad_id_only_with_sd2_files(tmp_path, vocab_and_merges):
    """With pad "!", a "!" in the text is a special token (id 0), as in transformers;
    otherwise BPE gives "!</w>"."""
    vocab, merges = vocab_and_merges
    sd1 = tk.load_clip_tokenizer(_write(tmp_path / "a", vocab, merges))
    sd2 = tk.load_clip_tokenizer(_write(tmp_path / "b", vocab, merges,
                                        {"pad_token": "!"}))
    assert sd1.encode("cat!") == [vocab["cat</w>"], vocab["!</w>"]]
    assert sd2.encode("cat!") == [vocab["cat</w>"], vocab["!"]] and vocab["!"] == 0


def test_open_clip_gz_vocabulary(tmp_path, vocab_and_merges):
    """open_clip's format: a header line, then merges; the vocabulary is rebuilt from
    them in open_clip's order, which is the order of the test vocabulary. Pads with 0."""
    vocab, merges = vocab_and_merges
    gz = tmp_path / tk.OPEN_CLIP_VOCAB
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write("bpe_simple_vocab_16e6.txt#version: 0.2\n")
        fh.write("".join(f"{a} {b}\n" for a, b in merges))
    ours = tk.load_clip_tokenizer(gz)
    assert ours.vocab == vocab
    theirs = transformers.CLIPTokenizer.from_pretrained(
        str(_write(tmp_path / "files", vocab, merges)))
    ref = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True)
    got = ours(PROMPTS)
    np.testing.assert_array_equal(got.attention_mask, ref["attention_mask"])
    mask = got.attention_mask == 1
    np.testing.assert_array_equal(got.input_ids[mask], np.asarray(ref["input_ids"])[mask])
    assert (got.input_ids[~mask] == 0).all() and (~mask).any()


@pytest.mark.parametrize("variant", ["sd1_no_config", "sd2_special_map"])
def test_tokenizer_json_as_transformers_5_saves_it(tmp_path, vocab_and_merges, variant):
    """transformers 5 saves a tokenizer as tokenizer.json (+ tokenizer_config.json), no
    vocab.json / merges.txt: read from it, the ids and pad token are the same."""
    vocab, merges = vocab_and_merges
    config, special_map, pad = VARIANTS[variant]
    files = _write(tmp_path / "files", vocab, merges, config, special_map)
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(str(files)).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    ours = tk.load_clip_tokenizer(saved)
    assert ours.vocab == vocab and ours.pad_token == pad
    np.testing.assert_array_equal(ours(PROMPTS).input_ids,
                                  tk.load_clip_tokenizer(files)(PROMPTS).input_ids)
    with pytest.raises(ValueError, match="not a BPE"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}')
        tk.load_clip_tokenizer(tmp_path / "bad")


def test_bpe_cache_and_batch_independence(vocab_and_merges):
    vocab, merges = vocab_and_merges
    t = tk.CLIPTokenizer(vocab, merges)
    one = t(PROMPTS[1]).input_ids
    batch = t([PROMPTS[0], PROMPTS[1], PROMPTS[1]]).input_ids
    np.testing.assert_array_equal(batch[1:], np.concatenate([one, one]))
    assert t._bpe.cache_info().hits > 0
    assert t(["a cat"], max_length=8).input_ids.shape == (1, 8)


def test_bad_inputs_are_named(tmp_path, vocab_and_merges):
    vocab, merges = vocab_and_merges
    t = tk.CLIPTokenizer(vocab, merges)
    with pytest.raises(ValueError, match="truncation=False"):
        t(PROMPTS[-1], truncation=False)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tk.CLIPTokenizer({k: v for k, v in vocab.items() if k != "<|endoftext|>"}, merges)
    with pytest.raises(ValueError, match="merge 1"):
        tk.CLIPTokenizer(vocab, [merges[0], ("c", "zzz")])
    bad = _write(tmp_path / "bad", vocab, merges)
    (bad / "merges.txt").write_text("#version: 0.2\nc a t\n")
    with pytest.raises(ValueError, match=r"merges.txt:2"):
        tk.load_clip_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        tk.load_clip_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="text 1"):
        t(["a", None])
