"""Captions for Fashion-MNIST built from facts of each image, and the demo vocabulary.

No captioned clothing dataset ships offline, so the text-to-image demo writes its own
captions from what is known of each image:
* its class, under one of a few names, and the group the class belongs to:
      top        T-shirt/top ("t-shirt", "tee"), Shirt ("shirt", "blouse")
      outerwear  Pullover ("pullover", "sweater", "jumper"), Coat ("coat", "jacket")
      bottoms    Trouser ("trousers", "pants")
      one-piece  Dress ("dress", "gown")
      footwear   Sandal ("sandal"), Sneaker ("sneaker", "trainer"),
                 Ankle boot ("ankle boot", "boot")
      accessory  Bag ("bag", "handbag", "purse")
  Tops are what covers the torso alone, outerwear what is worn over it, footwear the
  three shoe classes (so "footwear" with the negative prompt "sneaker" has two classes
  left to draw).
* two attributes measured from its pixels, each split at the median of its class on
  the train split, so every class is half "dark", half "light" and half "small", half
  "large" (a global split would call nearly every sandal small):
      tone  "dark" / "light": mean level of the foreground pixels (those >= 32 of 255),
            in [0, 1]. As stored: Fashion-MNIST's images are negatives of the product
            photos, so a "light" image shows a garment that was dark in the photo.
      size  "small" / "large": the fraction of the image's pixels that are foreground.
* a template drawn for each (example, epoch, seed): "a photo of a sneaker",
  "a dark sneaker", "light footwear", "a photo of a large dark coat", ...

The same measures score generated images (`measure_attributes`), so "a dark X" can be
checked against the brightness of its samples. Caption dropout (to the empty prompt "")
is the training step's, not the data's.
"""
from __future__ import annotations

import functools
import string
from typing import NamedTuple

import numpy as np

from diffusion.text.learn_bpe import clip_vocabulary, learn_bpe
from diffusion.text.tokenizer import CLIPTokenizer

FOREGROUND_LEVEL = 32  # uint8 level from which a pixel counts as the garment's

# (names, group) per Fashion-MNIST class, in FASHION_MNIST_CLASSES order; a name that is
# a plural takes "a pair of" for its article.
CLASS_WORDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("t-shirt", "tee"), "top"),
    (("trousers", "pants"), "bottoms"),
    (("pullover", "sweater", "jumper"), "outerwear"),
    (("dress", "gown"), "one-piece"),
    (("coat", "jacket"), "outerwear"),
    (("sandal",), "footwear"),
    (("shirt", "blouse"), "top"),
    (("sneaker", "trainer"), "footwear"),
    (("bag", "handbag", "purse"), "accessory"),
    (("ankle boot", "boot"), "footwear"),
)
PLURAL_NAMES = frozenset({"trousers", "pants"})
GROUPS = tuple(sorted({group for _, group in CLASS_WORDS}))
TONE_WORDS = ("dark", "light")    # index 1 = above the class median
SIZE_WORDS = ("small", "large")

# {a}: "a" / "an" for the word after it, "a pair of" before a plural name.
TEMPLATES = (
    "a photo of {a} {name}",
    "{a} {name}",
    "{name}",
    "{a} {tone} {name}",
    "{a} {size} {name}",
    "a photo of {a} {tone} {name}",
    "a photo of {a} {size} {tone} {name}",
    "{group}",
    "{tone} {group}",
    "{size} {group}",
    "{size} {tone} {group}",
)


class AttributeThresholds(NamedTuple):
    """Per-class medians, float [K] each: tone is "light" above `brightness[k]`, size
    "large" above `area[k]`."""
    brightness: np.ndarray
    area: np.ndarray


# Measured by `measure_thresholds` on the train split of Debian's dataset-fashion-mnist
# (60000 images); tests/test_captions.py recomputes them when the files are installed.
FASHION_MNIST_THRESHOLDS = AttributeThresholds(
    brightness=np.array([0.64280547, 0.70055791, 0.65963021, 0.69257228, 0.72736082,
                         0.52683601, 0.58349057, 0.60061881, 0.69221988, 0.70778203]),
    # foreground pixels of 784, written as counts so that the images at the median
    # compare equal to it (area is count / 784 in the same float arithmetic)
    area=np.array([422, 247, 474, 303, 448, 187, 457.5, 217, 417, 334]) / 784,
)


_CHUNK = 8192  # images measured at a time, bounding the float32 temporaries


def measure_attributes(images: np.ndarray, value_range: tuple[float, float] = (0, 255)
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(brightness [N], area [N]), float64: the mean level in [0, 1] of the foreground
    pixels (0 for an empty image) and the foreground's share of the image.

    images: [N, H, W, C] (channels averaged). value_range: what black and white are in
    `images`: (0, 255) for the dataset's uint8, (-1, 1) for model samples."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    n = len(images)
    brightness, area = np.zeros(n), np.zeros(n)
    for start in range(0, n, _CHUNK):
        x = images[start:start + _CHUNK].reshape(-1, images.shape[1] * images.shape[2],
                                                 images.shape[3]).astype(np.float32)
        x = x[..., 0] if x.shape[-1] == 1 else x.mean(axis=-1)
        levels = (x - np.float32(lo)) * np.float32(255.0 / (hi - lo))  # 0..255 scale
        foreground = (levels >= FOREGROUND_LEVEL).astype(np.float32)
        count = foreground.sum(axis=1, dtype=np.float64)
        total = (levels * foreground).sum(axis=1, dtype=np.float64)
        brightness[start:start + _CHUNK] = total / np.maximum(count, 1) / 255.0
        area[start:start + _CHUNK] = count / x.shape[1]
    return np.clip(brightness, 0.0, 1.0), area


def measure_thresholds(images: np.ndarray, labels: np.ndarray, num_classes: int,
                       value_range: tuple[float, float] = (0, 255)) -> AttributeThresholds:
    """Per-class medians of brightness and area (how FASHION_MNIST_THRESHOLDS was made)."""
    labels = np.asarray(labels)
    brightness, area = measure_attributes(images, value_range)
    missing = [k for k in range(num_classes) if not np.any(labels == k)]
    if missing:
        raise ValueError(f"classes {missing} have no examples to measure thresholds on")
    return AttributeThresholds(
        np.array([np.median(brightness[labels == k]) for k in range(num_classes)]),
        np.array([np.median(area[labels == k]) for k in range(num_classes)]))


def attribute_bits(images: np.ndarray, labels: np.ndarray,
                   thresholds: AttributeThresholds = FASHION_MNIST_THRESHOLDS,
                   value_range: tuple[float, float] = (0, 255)) -> tuple[np.ndarray, np.ndarray]:
    """(light [N], large [N]) bool: each image against the thresholds of its class."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(thresholds.brightness):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside the "
                         f"{len(thresholds.brightness)} classes of the thresholds")
    brightness, area = measure_attributes(images, value_range)
    return brightness > thresholds.brightness[labels], area > thresholds.area[labels]


def _article(next_word: str, name: str) -> str:
    if name in PLURAL_NAMES:
        return "a pair of"
    return "an" if next_word[0] in "aeiou" else "a"


def caption(label: int, template: int, synonym: int, light: bool, large: bool) -> str:
    """The caption text of one choice; `synonym` is taken modulo the class's names."""
    names, group = CLASS_WORDS[label]
    name = names[synonym % len(names)]
    fields = dict(name=name, group=group, tone=TONE_WORDS[int(light)],
                  size=SIZE_WORDS[int(large)])
    words = []
    for literal, field, _, _ in string.Formatter().parse(TEMPLATES[template]):
        words += literal.split()
        if field == "a":
            words.append(None)  # resolved once the next word is known
        elif field:
            words.append(fields[field])
    for i, word in enumerate(words):
        if word is None:
            words[i] = _article(words[i + 1], name)
    return " ".join(words)


def class_prompt(label: int) -> str:
    """"a photo of a {first name}": the prompt that scores class accuracy."""
    return caption(label, 0, 0, False, False)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a counter-based hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def caption_draws(indices: np.ndarray, epochs: np.ndarray, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(template [n], synonym [n]) int64 for examples `indices` seen in `epochs`: a
    pure function of (seed, epoch, index), so captions are reproducible and resumable,
    and change from epoch to epoch."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    indices = np.asarray(indices, np.int64)
    epochs = np.broadcast_to(np.asarray(epochs, np.int64), indices.shape)
    if indices.size and (indices.min() < 0 or epochs.min() < 0):
        raise ValueError("example indices and epochs must be non-negative")
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
        h = _mix(h ^ epochs.astype(np.uint64))
        h = _mix(h ^ indices.astype(np.uint64))
    template = (h % np.uint64(len(TEMPLATES))).astype(np.int64)
    synonym = ((h >> np.uint64(32)) % np.uint64(6)).astype(np.int64)  # 6 = lcm(1, 2, 3)
    return template, synonym


def all_captions() -> list[str]:
    """Every caption the templates can write, each once, in a fixed order, then ""."""
    out = dict.fromkeys(
        caption(k, t, s, bool(b), bool(a))
        for k in range(len(CLASS_WORDS)) for t in range(len(TEMPLATES))
        for s in range(len(CLASS_WORDS[k][0])) for b in (0, 1) for a in (0, 1))
    return list(out) + [""]


class CaptionTable:
    """Every caption's token ids, looked up per example rather than tokenized per batch.

    rows: int32 [M, L], one row per entry of `all_captions()`; `index(...)` maps a
    choice (label, template, synonym, light, large) to its row.
    """

    def __init__(self, tokenizer: CLIPTokenizer):
        self.texts = all_captions()
        row_of = {text: i for i, text in enumerate(self.texts)}
        self.rows = tokenizer(self.texts).input_ids
        k, t = len(CLASS_WORDS), len(TEMPLATES)
        self._index = np.empty((k, t, 6, 2, 2), np.int64)
        for label, template, synonym, light, large in np.ndindex(*self._index.shape):
            self._index[label, template, synonym, light, large] = row_of[
                caption(label, template, synonym, bool(light), bool(large))]
        self.null_row = row_of[""]
        self.null_tokens = self.rows[self.null_row]

    def index(self, labels: np.ndarray, template: np.ndarray, synonym: np.ndarray,
              light: np.ndarray, large: np.ndarray) -> np.ndarray:
        return self._index[labels, template, synonym, light.astype(np.int64),
                           large.astype(np.int64)]


@functools.lru_cache(maxsize=1)
def demo_merges() -> tuple[tuple[str, str], ...]:
    """BPE merges learned from `all_captions()` (each caption counted once)."""
    return tuple(learn_bpe(all_captions()))


def demo_tokenizer() -> CLIPTokenizer:
    """The demo's tokenizer: CLIP's BPE over the vocabulary learned from the captions
    (what `python -m diffusion.text.vocab --out DIR` writes). Every caption word is one
    token; any other text still tokenizes, byte by byte at worst."""
    merges = demo_merges()
    return CLIPTokenizer(clip_vocabulary(merges), merges)

