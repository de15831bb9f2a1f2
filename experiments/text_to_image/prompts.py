"""The prompts the text-to-image study samples, and how each is scored.

Prompts are written from the caption vocabulary (diffusion.data.captions), so each
names classes the shipped classifier can check: "a photo of a sneaker" names class 7,
"footwear" the three shoe classes. A row's class accuracy is the share of its samples
classified into the classes its prompt names and its negative prompt does not
("footwear" without "sneaker": sandals and ankle boots).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from diffusion.data import captions
from diffusion.evaluation import prompts as scores

NUM_CLASSES = len(captions.CLASS_WORDS)
ALL_CLASSES = "a photo of a {class} (all 10 class prompts)"
_TONE_TEMPLATE = 5  # captions.TEMPLATES[5] = "a photo of {a} {tone} {name}"


class Row(NamedTuple):
    """One prompt (or the pooled class prompts) at one guidance weight, scored."""
    prompt: str
    negative_prompt: str
    guidance: float
    num_samples: int
    accuracy: scores.Share      # share in the named classes, Wilson 95% interval
    brightness: scores.Share    # mean foreground level in [0, 1], mean +- 1.96 SE
    fid: scores.Share | None    # only for the pooled class prompts (bootstrap 95%)

    def csv_fields(self) -> list:
        fid = ["", "", ""] if self.fid is None else [
            f"{v:.3f}" for v in (self.fid.value, self.fid.lo, self.fid.hi)]
        return [self.prompt, self.negative_prompt, self.guidance, self.num_samples,
                f"{self.accuracy.value:.4f}", f"{self.accuracy.lo:.4f}",
                f"{self.accuracy.hi:.4f}", f"{self.brightness.value:.4f}", *fid]


CSV_COLUMNS = ["prompt", "negative_prompt", "guidance", "num_samples", "class_accuracy",
               "acc_lo", "acc_hi", "mean_brightness", "fid", "fid_lo", "fid_hi"]


def class_prompts() -> list[str]:
    return [captions.class_prompt(k) for k in range(NUM_CLASSES)]


def tone_prompts(label: int) -> tuple[str, str]:
    """("a photo of a dark X", "a photo of a light X") for class `label`."""
    return tuple(captions.caption(label, _TONE_TEMPLATE, 0, light, False)
                 for light in (False, True))


def named_classes(text: str) -> set[int]:
    """The classes a text names: by any of their names or by their group, matched as
    whole words ("shirt" is not inside "t-shirt")."""
    words = text.lower().split()
    out = set()
    for k, (names, group) in enumerate(captions.CLASS_WORDS):
        for name in (*names, group):
            part = name.split()
            if any(words[i:i + len(part)] == part for i in range(len(words))):
                out.add(k)
    return out


def target_classes(prompt: str, negative: str = "") -> set[int]:
    """Classes a sample of `prompt` should fall in: named by it, not by the negative."""
    target = named_classes(prompt) - named_classes(negative)
    if not target:
        raise ValueError(f"prompt {prompt!r} (negative {negative!r}) names no class left "
                         "to score")
    return target


def predicted(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs).argmax(axis=-1)


def share_in(classes: np.ndarray, targets: set[int]) -> scores.Share:
    return scores.wilson_share(int(np.isin(classes, sorted(targets)).sum()), len(classes))


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean foreground level [N] in [0, 1] of samples in [-1, 1]."""
    return captions.measure_attributes(images, (-1, 1))[0]


def score(prompt: str, negative: str, guidance: float, images: np.ndarray,
          probs: np.ndarray, fid: scores.Share | None = None,
          targets: Sequence[int] | None = None) -> Row:
    """A Row for samples images [n, H, W, C] in [-1, 1] with classifier probs [n, K]."""
    goal = set(targets) if targets is not None else target_classes(prompt, negative)
    return Row(prompt, negative, float(guidance), len(images),
               share_in(predicted(probs), goal), scores.mean_interval(brightness(images)),
               fid)
