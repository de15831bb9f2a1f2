"""Prompts as a text-conditional model is sampled with them, and their token ids.

A sampling request names prompts in one of two ways: a string holding one prompt or
several separated by "|" ("a photo of a bag|a dark sneaker"), or a file with one prompt
per line (blank lines skipped). A negative prompt is one string for every prompt, or
"|"-separated, one per prompt; none means the empty prompt "", which is also what
caption dropout trains the unconditional branch on.

`prompt_pairs(tokenizer, prompts, negatives)` -> int32 [P, 2, L]: row p holds the
token ids of prompt p and of its negative prompt, the form in which prompts travel to
a sampling function (which encodes both and guides from the negative to the prompt).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from diffusion.text.tokenizer import CLIPTokenizer

PROMPT_SEPARATOR = "|"

Prompts = Union[str, Sequence[str]]


def split_prompts(text: str) -> list[str]:
    """"a|b" -> ["a", "b"] (each stripped); "" -> []."""
    if not text.strip():
        return []
    return [p.strip() for p in text.split(PROMPT_SEPARATOR)]


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line of a text file; blank lines are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist (one prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompt (one prompt per line)")
    return prompts


def prompts_from(prompt: str = "", prompts_file: str = "") -> list[str]:
    """The prompts of a sampling request: `prompt` ("|"-separated) or the lines of
    `prompts_file`; [] when both are empty. Both set is an error (which one is meant?)."""
    if prompt.strip() and prompts_file:
        raise ValueError("set either sample.prompt or sample.prompts_file, not both")
    if prompts_file:
        return read_prompts_file(prompts_file)
    return split_prompts(prompt)


def as_list(prompts: Optional[Prompts], what: str = "prompt") -> list[str]:
    """A string (one prompt, taken as it is) or a sequence of strings -> list; None -> []."""
    if prompts is None:
        return []
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = [p for p in items if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{what} must be a string or a list of strings, got {bad[0]!r}")
    return items


def negatives_for(negative: Optional[Prompts], num_prompts: int) -> list[str]:
    """One negative prompt per prompt: None or "" -> "" each; one string -> that string
    for every prompt; a list (or a "|"-separated string) of num_prompts -> as given."""
    if negative is None:
        return [""] * num_prompts
    items = (split_prompts(negative) if isinstance(negative, str) else as_list(negative,
                                                                           "negative_prompt"))
    if len(items) <= 1:
        return [items[0] if items else ""] * num_prompts
    if len(items) != num_prompts:
        raise ValueError(f"{len(items)} negative prompts for {num_prompts} prompts: give "
                         "one for all, or one per prompt")
    return items


def prompt_pairs(tokenizer: CLIPTokenizer, prompts: Sequence[str],
                 negatives: Sequence[str]) -> np.ndarray:
    """int32 [P, 2, L]: the ids of prompt p ([:, 0]) and its negative prompt ([:, 1]),
    each bos + text + eos padded to the tokenizer's max_length."""
    if len(prompts) != len(negatives):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    if not prompts:
        raise ValueError("no prompt to sample: give at least one (\"\" is the empty prompt)")
    ids = tokenizer(list(prompts) + list(negatives)).input_ids
    p = len(prompts)
    return np.stack([ids[:p], ids[p:]], axis=1).astype(np.int32)
