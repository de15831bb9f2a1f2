"""Learning a small byte-level BPE vocabulary in CLIP's format from a text corpus.

Stable Diffusion's tokenizer files (vocab.json, merges.txt) come from CLIP's training
corpus; offline we have none, so a model trained from scratch on captions of our own
gets a vocabulary learned from those captions (Sennrich et al. 2016's BPE on CLIP's
byte-level alphabet):
1. Every text is split into pieces exactly as `CLIPTokenizer` splits it
   (`tokenizer.pre_tokenize`); each distinct piece is a word with a count.
2. A word is its UTF-8 bytes as `bytes_to_unicode` characters, the last one carrying
   `</w>`.
3. Repeatedly, the adjacent pair of symbols with the largest count summed over all
   words (ties: the smallest pair in string order, so the result does not depend on the
   order of the corpus) becomes one symbol in every word, until no word has two symbols
   left or `max_merges` is reached.
The vocabulary has CLIP's layout: the 256 byte characters, the same with `</w>`, one
token per merge, then `<|startoftext|>` and `<|endoftext|>` (the largest id, which is
where CLIP's pooling rule looks for it). So any text still tokenizes (byte fallback),
and every piece of the corpus is one token.
"""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Sequence

from diffusion.text.tokenizer import (BOS, CONTEXT_LENGTH, END_OF_WORD, EOS,
                                      bytes_to_unicode, pre_tokenize)

_BYTE_CHARS = bytes_to_unicode()


def word_counts(texts: Iterable[str]) -> collections.Counter:
    """{piece: number of occurrences} over the texts, pieces as the tokenizer splits."""
    counts: collections.Counter = collections.Counter()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"corpus entries must be str, got {type(text).__name__}")
        counts.update(pre_tokenize(text))
    return counts


def _symbols(piece: str) -> tuple[str, ...]:
    chars = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
    chars[-1] += END_OF_WORD
    return tuple(chars)


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Every occurrence of `pair` in `word` as one symbol, left to right."""
    out, j = [], 0
    while j < len(word):
        if j + 1 < len(word) and (word[j], word[j + 1]) == pair:
            out.append(word[j] + word[j + 1])
            j += 2
        else:
            out.append(word[j])
            j += 1
    return tuple(out)


def learn_bpe(texts: Iterable[str], max_merges: int | None = None) -> list[tuple[str, str]]:
    """The ranked merge list learned from `texts` (see the module docstring)."""
    if max_merges is not None and max_merges < 0:
        raise ValueError(f"max_merges must be >= 0 or None, got {max_merges}")
    words = collections.Counter()
    for piece, count in word_counts(texts).items():
        words[_symbols(piece)] += count
    merges: list[tuple[str, str]] = []
    while max_merges is None or len(merges) < max_merges:
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, count in words.items():
            merged[_merge_word(word, best) if best[0] in word else word] += count
        words = merged
    return merges


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's layout: bytes, bytes + </w>, each merge's result (first occurrence), bos,
    eos. Two merges may yield the same string by different routes; it gets one id."""
    chars = list(_BYTE_CHARS.values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for token in tokens + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab


def write_vocabulary(folder: str | os.PathLike, merges: Sequence[tuple[str, str]],
                     max_length: int = CONTEXT_LENGTH) -> dict[str, int]:
    """Writes vocab.json, merges.txt and tokenizer_config.json as an SD `tokenizer/`
    folder has them (readable by `load_clip_tokenizer` and transformers'
    CLIPTokenizer); returns the vocabulary."""
    vocab = clip_vocabulary(merges)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = dict(bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS,
                  model_max_length=max_length, do_lower_case=True,
                  tokenizer_class="CLIPTokenizer")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return vocab
