r"""CLIP's byte-level BPE tokenizer, as Stable Diffusion's text encoders read it.

The ids equal those of transformers' `CLIPTokenizer` (5.x, backed by `tokenizers`) on
the same files. Its steps, in order:
1. Special tokens (bos, eos, and the pad/unk tokens the files name) are cut out of the
   raw text first and map straight to their ids. So with SD 2's pad token "!", a "!" in
   a prompt is id 0, not the "!</w>" BPE would give it: transformers does the same.
2. Normalisation: Unicode NFC, every run of Unicode White_Space to one space, lower case
   (character by character). transformers 5 has no ftfy step and no BERT-style
   cleaning (control characters, CJK spacing) any more; neither do we.
3. Pre-tokenisation by CLIP's pattern
   `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`:
   letter runs, single digits, runs of anything else that is not a space, and English
   contractions. transformers then applies GPT-2's byte-level pattern to each piece,
   which leaves every piece whole except the two special-token strings (there only
   after lower-casing, e.g. "<|ENDOFTEXT|>"): they split into "<|", the letters, "|>",
   exactly as if the pattern lacked those two alternatives, so `_pre_tokenize` omits
   them. The stdlib `re` has no \p{L}/\p{N}; rather than add the `regex` package as
   a run-time dependency, `_pre_tokenize` scans the text once with the classes taken
   from `unicodedata` categories (L*, N*): the remaining alternatives start on
   disjoint character classes (only "'" also starts a run), so a scanner states the
   pattern exactly.
4. Each piece's UTF-8 bytes map to printable characters (`bytes_to_unicode`), the last
   one gets the `</w>` suffix, and BPE merges the adjacent pair of lowest rank until
   none is in the merge list.
5. `<|startoftext|>` ids `<|endoftext|>`, truncated to max_length (77) and padded.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
# open_clip's SimpleTokenizer uses the first 49152 - 256 - 2 merges of its file, which
# makes a 49408-token vocabulary (256 bytes, 256 bytes + </w>, merges, bos, eos).
OPEN_CLIP_NUM_MERGES = 49152 - 256 - 2
OPEN_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# The Unicode White_Space property (what `\s` means to the Rust regex in `tokenizers`;
# Python's `str.isspace` also accepts U+001C..U+001F, which are not White_Space).
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(chr(c) for c in range(0x2000, 0x200B)))
_WHITE_SPACE_RUN = re.compile("[" + re.escape("".join(sorted(_WHITE_SPACE))) + "]+")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


class TokenizedText(NamedTuple):
    """input_ids [B, L] int32; attention_mask [B, L] int32 (1 on bos, text, eos; 0 on
    padding); eos_positions [B] int32, the index of each row's first eos token (the
    state CLIP's pooled output reads)."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    eos_positions: np.ndarray


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, so that BPE never sees whitespace or control bytes:
    printable Latin-1 bytes keep their character, the other 68 go to U+0100 onwards.
    The dict's order (printable bytes first) is the order of the first 256 ids."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_BYTE_CHARS = bytes_to_unicode()


def normalize(text: str) -> str:
    """NFC, each run of whitespace to one space, lower case (transformers' normaliser).

    Lower case is taken character by character, as `tokenizers` does: a final capital
    sigma becomes σ, not the ς that `str.lower`'s context rule gives."""
    text = _WHITE_SPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def _char_class(c: str) -> str:
    """'L' letter, 'N' number, 'S' space, 'O' anything else."""
    if c in _WHITE_SPACE:
        return "S"
    cat = unicodedata.category(c)[0]
    return cat if cat in ("L", "N") else "O"


def _pre_tokenize(text: str) -> list[str]:
    """Split normalised text into CLIP's pieces (see the module docstring, step 3).

    At each position the pattern's first matching alternative wins, and a run, once
    started, is greedy: "!'s" is one punctuation run then "s", not "!" + "'s"."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        kind = _char_class(c)
        if kind == "S":
            i += 1
            continue
        end = None
        if c == "'":
            end = next((i + len(s) for s in _CONTRACTIONS if text.startswith(s, i)), None)
        if end is None:
            end = i + 1
            if kind != "N":  # digits are single; letter and other runs are greedy
                while end < n and _char_class(text[end]) == kind:
                    end += 1
        pieces.append(text[i:end])
        i = end
    return pieces


def pre_tokenize(text: str) -> list[str]:
    """The pieces of raw `text` that BPE merges within (normalised, then split as in
    step 3): what a vocabulary for this tokenizer is learned from."""
    return _pre_tokenize(normalize(text))


class CLIPTokenizer:
    """CLIP's BPE over a vocabulary (token -> id) and a ranked merge list.

    special_tokens: strings cut out of the raw text as single ids (default: bos, eos,
    pad and unk). pad_token: what fills rows up to max_length (SD 1.x: eos; SD 2.x:
    "!", id 0). unk_token: the id of a symbol missing from the vocabulary (never needed
    with a full byte-level vocabulary). `tokenizer(texts)` returns `TokenizedText`.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str = BOS, eos_token: str = EOS, pad_token: str = EOS,
                 unk_token: str = EOS, max_length: int = CONTEXT_LENGTH,
                 special_tokens: Sequence[str] | None = None, cache_size: int = 65536):
        self.vocab = dict(vocab)
        for role, tok in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token),
                          ("unk", unk_token)):
            if tok not in self.vocab:
                raise ValueError(f"{role} token {tok!r} is not in the vocabulary")
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(merges):
            if len(pair) != 2 or pair[0] + pair[1] not in self.vocab:
                raise ValueError(f"merge {rank} {pair!r}: its result is not in the "
                                 f"vocabulary (or it is not a pair)")
            self.ranks.setdefault(tuple(pair), rank)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (bos and eos), got {max_length}")
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            bos_token, eos_token, pad_token, unk_token)
        self.bos_id, self.eos_id = self.vocab[bos_token], self.vocab[eos_token]
        self.pad_id, self.unk_id = self.vocab[pad_token], self.vocab[unk_token]
        self.max_length = max_length
        if special_tokens is None:
            special_tokens = (bos_token, eos_token, pad_token, unk_token)
        missing = [t for t in special_tokens if t not in self.vocab]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the vocabulary")
        self.special_tokens = tuple(dict.fromkeys(special_tokens))
        # Longest first: at one position the longest special token wins.
        self._special_re = re.compile("|".join(
            re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True)))
        self._bpe = functools.lru_cache(maxsize=cache_size)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenised piece: its bytes as characters, `</w>` on the last."""
        word = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
        word[-1] += END_OF_WORD
        while len(word) > 1:
            ranked = [(self.ranks[p], j) for j, p in enumerate(zip(word, word[1:]))
                      if p in self.ranks]
            if not ranked:
                break
            _, j = min(ranked)
            first, second = word[j], word[j + 1]
            merged, j = [], 0
            while j < len(word):  # every occurrence, left to right, non-overlapping
                if j + 1 < len(word) and word[j] == first and word[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            word = merged
        return tuple(self.vocab.get(s, self.unk_id) for s in word)

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without bos/eos, untruncated."""
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            ids += self._encode_plain(text[start:m.start()])
            ids.append(self.vocab[m.group()])
            start = m.end()
        return ids + self._encode_plain(text[start:])

    def _encode_plain(self, text: str) -> list[int]:
        return [i for piece in _pre_tokenize(normalize(text)) for i in self._bpe(piece)]

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
                 truncation: bool = True) -> TokenizedText:
        """Tokenize a batch: bos + ids + eos, truncated to max_length (default: the
        tokenizer's, 77) keeping bos and eos, padded with pad_id to max_length."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.max_length if max_length is None else max_length
        if length < 2:
            raise ValueError(f"max_length must be >= 2 (bos and eos), got {length}")
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        eos_positions = np.zeros((len(texts),), np.int32)
        for b, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {b} is a {type(text).__name__}, not a str")
            body = self.encode(text)
            if len(body) > length - 2:
                if not truncation:
                    raise ValueError(f"text {b} has {len(body) + 2} tokens, more than "
                                     f"max_length={length} (truncation=False)")
                body = body[:length - 2]
            row = [self.bos_id, *body, self.eos_id]
            ids[b, :len(row)] = row
            mask[b, :len(row)] = 1
            eos_positions[b] = row.index(self.eos_id)  # a prompt may hold eos itself
        return TokenizedText(ids, mask, eos_positions)


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """merges.txt: one 'a b' pair a line, ranked by order; '#version' lines skipped."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        pair = line.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: expected two tokens separated by one "
                             f"space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def read_open_clip_vocab(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's gzipped merge list -> (vocab, merges), the vocabulary built as
    open_clip builds it: bytes, bytes + </w>, one token per merge, bos, eos."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = []
    for number, line in enumerate(lines[1:1 + OPEN_CLIP_NUM_MERGES], 2):
        pair = line.split()
        if not pair:
            continue  # the trailing newline of a short file
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: expected a merge pair, got {line!r}")
        merges.append((pair[0], pair[1]))
    chars = list(_BYTE_CHARS.values())
    tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def read_tokenizer_json(path: str | os.PathLike
                        ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tokenizer.json (the `tokenizers` file, all transformers 5 saves of a tokenizer:
    a pipeline saved with it has no vocab.json / merges.txt) -> (vocab, merges): its BPE
    model's vocabulary with the added tokens, and its merges ("a b" strings or pairs)."""
    data = _read_json(os.fspath(path))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: not a BPE tokenizer (model type {model.get('type')!r})")
    vocab = dict(model["vocab"])
    for token in data.get("added_tokens") or ():
        vocab.setdefault(token["content"], int(token["id"]))
    merges = []
    for number, merge in enumerate(model.get("merges") or (), 1):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2:
            raise ValueError(f"{path}: merge {number} is not a pair: {merge!r}")
        merges.append((pair[0], pair[1]))
    return vocab, merges


def _token_string(value: Any, what: str) -> str:
    """A token as tokenizer_config.json / special_tokens_map.json store it: a string or
    a serialised AddedToken {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{what}: expected a token string or {{'content': ...}}, got {value!r}")


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_clip_tokenizer(path: str | os.PathLike, max_length: int | None = None) -> CLIPTokenizer:
    """A tokenizer from SD checkpoint files or open_clip's vocabulary.

    path: a folder with vocab.json + merges.txt, or the tokenizer.json transformers 5
    saves instead (an SD pipeline folder with a `tokenizer/` subfolder also works;
    tokenizer_config.json and special_tokens_map.json are read when present, with
    transformers' precedence: special_tokens_map.json
    overrides the config unless the config lists `added_tokens_decoder`), or open_clip's
    `bpe_simple_vocab_16e6.txt.gz` (bos/eos as open_clip, padded with id 0 like
    open_clip's `tokenize`). max_length: default the config's model_max_length, else 77.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gz"):
        vocab, merges = read_open_clip_vocab(path)
        pad = next(t for t, i in vocab.items() if i == 0)
        return CLIPTokenizer(vocab, merges, pad_token=pad, special_tokens=(BOS, EOS),
                             max_length=max_length or CONTEXT_LENGTH)

    def has_files(folder: str) -> bool:
        return all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")) \
            or os.path.isfile(os.path.join(folder, "tokenizer.json"))
    folder = path
    if not has_files(folder) and has_files(os.path.join(folder, "tokenizer")):
        folder = os.path.join(folder, "tokenizer")
    if all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")):
        vocab = _read_json(os.path.join(folder, "vocab.json"))
        merges = read_merges(os.path.join(folder, "merges.txt"))
    elif os.path.isfile(os.path.join(folder, "tokenizer.json")):
        vocab, merges = read_tokenizer_json(os.path.join(folder, "tokenizer.json"))
    else:
        missing = [n for n in ("vocab.json", "merges.txt")
                   if not os.path.isfile(os.path.join(folder, n))]
        raise FileNotFoundError(f"no {' or '.join(missing)} (nor tokenizer.json) in "
                                f"{folder} (expected a CLIP tokenizer folder or an "
                                f"open_clip {OPEN_CLIP_VOCAB})")
    config_file = os.path.join(folder, "tokenizer_config.json")
    config = _read_json(config_file) if os.path.isfile(config_file) else {}
    tokens = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
              if config.get(k) is not None}
    map_file = os.path.join(folder, "special_tokens_map.json")
    if "added_tokens_decoder" not in config and os.path.isfile(map_file):
        tokens.update({k: v for k, v in _read_json(map_file).items()
                       if k in ("bos_token", "eos_token", "pad_token", "unk_token")})
    kwargs = {k: _token_string(v, f"{folder}: {k}") for k, v in tokens.items()}
    if max_length is None:
        max_length = config.get("model_max_length")
        # transformers writes a huge number when the length is unknown.
        if not isinstance(max_length, int) or max_length > 10**6:
            max_length = CONTEXT_LENGTH
    return CLIPTokenizer(vocab, merges, max_length=max_length, **kwargs)
