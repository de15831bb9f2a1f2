"""Fashion-MNIST with a caption per example and epoch, as CLIP token ids.

    source = make_source("fashion_mnist_captions")        # or fashion_mnist_captions_source()
    batches = BatchIterator(source, 128, seed=0, random_flip=True)
    batch = next(batches)  # image [B, 28, 28, 1], label [B], tokens int32 [B, 77]

The caption of example i in epoch e is a pure function of (seed, e, i) and the image's
facts (`diffusion.data.captions`), so batches are reproducible and resume exactly like
the images: BatchIterator asks `source.conditioning(indices, epochs, seed)` for them.
Horizontal flips leave every fact (class, tone, size) true, so they stay allowed.
Token ids come from a table of every caption tokenized once, so a batch costs one
lookup. With embeddings of that table (`with_caption_embeddings`, the cache of a frozen
text encoder) batches carry context=float32 [B, L, D] rows of it instead of tokens.
The tokenizer is the demo vocabulary (`captions.demo_tokenizer`) unless a folder of CLIP
tokenizer files is given.
"""
from __future__ import annotations

import copy

import numpy as np

from diffusion.data import captions, idx
from diffusion.data.resize import as_size, crop_resize
from diffusion.data.sources import ArraySource, fashion_mnist_source
from diffusion.text.tokenizer import CLIPTokenizer, load_clip_tokenizer


class CaptionedSource(ArraySource):
    """An in-memory labelled dataset of the 10 Fashion-MNIST classes, with captions.

    images uint8 [N, H, W, C], labels int32 [N] in [0, 10). The tone and size of each
    image are measured once, here, on these pixels (and kept when the images are
    resized). tokenizer: default the demo vocabulary. thresholds: the per-class medians
    the attributes are split at (default: those of the Fashion-MNIST train split, so
    train and test captions mean the same).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *,
                 tokenizer: CLIPTokenizer | None = None,
                 thresholds: captions.AttributeThresholds = captions.FASHION_MNIST_THRESHOLDS,
                 class_names: tuple[str, ...] | None = idx.FASHION_MNIST_CLASSES,
                 name: str = "captioned"):
        num_classes = len(captions.CLASS_WORDS)
        super().__init__(images, labels, num_classes, class_names, name)
        if self.labels.min() < 0 or self.labels.max() >= num_classes:
            raise ValueError(f"{name}: labels span [{self.labels.min()}, "
                             f"{self.labels.max()}]; captions know classes 0..{num_classes - 1}")
        self.light, self.large = captions.attribute_bits(self.images, self.labels, thresholds)
        self.tokenizer = tokenizer or captions.demo_tokenizer()
        self.table = captions.CaptionTable(self.tokenizer)
        self.embeddings = None  # float32 [M, L, D]: with_caption_embeddings

    @property
    def vocab_size(self) -> int:
        """Token ids are < vocab_size (the text encoder's embedding rows)."""
        return self.tokenizer.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def null_tokens(self) -> np.ndarray:
        """int32 [L]: the empty prompt "", what caption dropout substitutes."""
        return self.table.null_tokens

    @property
    def caption_tokens(self) -> np.ndarray:
        """int32 [M, L]: every caption this source can write (and ""), tokenized."""
        return self.table.rows

    def with_caption_embeddings(self, embeddings: np.ndarray) -> "CaptionedSource":
        """A copy whose batches carry context = embeddings[row] (float32 [M, L, D], one
        row per row of caption_tokens) in place of token ids."""
        if embeddings.ndim != 3 or embeddings.shape[:2] != self.caption_tokens.shape:
            raise ValueError(f"{self.name}: caption embeddings of shape {embeddings.shape} "
                             f"do not match the {self.caption_tokens.shape} caption table")
        out = copy.copy(self)
        out.embeddings = embeddings
        return out

    @property
    def null_context(self) -> np.ndarray | None:
        """float32 [L, D]: the empty prompt's embeddings (None without a cache)."""
        return None if self.embeddings is None else np.asarray(
            self.embeddings[self.table.null_row])

    def _rows(self, indices: np.ndarray, epochs: np.ndarray, seed: int) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"{self.name}: example indices outside [0, {len(self)})")
        template, synonym = captions.caption_draws(indices, epochs, seed)
        return self.table.index(self.labels[indices], template, synonym,
                                self.light[indices], self.large[indices])

    def conditioning(self, indices: np.ndarray, epochs: np.ndarray,
                     seed: int) -> dict[str, np.ndarray]:
        """dict(tokens=int32 [n, L]) for examples `indices` seen in `epochs` [n], or
        dict(context=float32 [n, L, D]) with caption embeddings."""
        rows = self._rows(indices, epochs, seed)
        if self.embeddings is not None:
            return dict(context=np.asarray(self.embeddings[rows], np.float32))
        return dict(tokens=self.table.rows[rows])

    def caption_texts(self, indices: np.ndarray, epochs: np.ndarray, seed: int) -> list[str]:
        """The caption texts behind `conditioning` (for logging and sample grids)."""
        return [self.table.texts[r] for r in self._rows(indices, epochs, seed)]

    def resized(self, image_size: int | tuple[int, int]) -> "CaptionedSource":
        """The same data, images cropped/resized once; attributes and captions kept."""
        size = as_size(image_size)
        if size == self.image_shape[:2]:
            return self
        out = copy.copy(self)
        out.images = crop_resize(self.images, size)
        out.name = f"{self.name}@{size[0]}x{size[1]}"
        return out


def fashion_mnist_captions_source(split: str = "train", data_dir: str | None = None,
                                  vocab_dir: str | None = None) -> CaptionedSource:
    """Fashion-MNIST (Debian's dataset-fashion-mnist, or the same IDX files in
    `data_dir`) with captions; `vocab_dir`: CLIP tokenizer files instead of the demo
    vocabulary (e.g. those `python -m diffusion.text.vocab --out DIR` wrote)."""
    plain = fashion_mnist_source(split, data_dir)
    tokenizer = load_clip_tokenizer(vocab_dir) if vocab_dir else None
    return CaptionedSource(plain.images, plain.labels, tokenizer=tokenizer,
                           name=f"fashion_mnist_captions:{split}")
