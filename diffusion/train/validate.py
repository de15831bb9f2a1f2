"""Config checks that run first in a run's setup, before anything is built or compiled.

Each bad value fails here with one line naming the key, instead of a ZeroDivisionError
after compilation or a silently diverging run (lr < 0). A network's own constraints
(U-Net attention resolutions that no level reaches) are checked by its builder in
diffusion.models.MODELS.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from diffusion.config_file import ConfigError
from diffusion.models import attention_implementation
from diffusion.train.profiling import parse_profile_steps
from diffusion.train_state import flat_updates


# Objectives whose train step feeds a text-conditional model its captions.
TEXT_OBJECTIVES = ("diffusion",)


def _positive_int(c: ml_collections.ConfigDict, key: str) -> None:
    v = _get(c, key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {v!r}")


def _non_negative(c: ml_collections.ConfigDict, key: str) -> None:
    v = _get(c, key)
    if v is not None and v < 0:
        raise ConfigError(f"{key} must be >= 0 (0 = off), got {v!r}")


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def check_config(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks the keys every run reads; raises ConfigError naming the first bad key."""
    for key in ("train.num_steps", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "data.global_batch_size"):
        _positive_int(c, key)
    for key in ("train.sample_every", "train.eval_every", "optim.warmup_steps",
                "optim.grad_clip", "optim.weight_decay"):
        _non_negative(c, key)
    try:
        parse_profile_steps(c.train.get("profile_steps", ""))
        attention_implementation(c.model.get("attention_impl", ""), c.model.dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    lr = c.optim.lr
    if not (isinstance(lr, (int, float)) and lr > 0 and lr != float("inf")):
        raise ConfigError(f"optim.lr must be a finite number > 0, got {lr!r}")
    if not 0.0 <= c.ema.decay <= 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1], got {c.ema.decay!r}")
    if flat_updates(c.optim) and c.train.get("fsdp", False):
        raise ConfigError("optim.flatten=True keeps the optimizer state as one vector, "
                          "which train.fsdp cannot split by array; set one of them False")
    if c.data.global_batch_size % num_devices:
        raise ConfigError(
            f"data.global_batch_size={c.data.global_batch_size} is not divisible by the "
            f"{num_devices} devices of the job; use a multiple of {num_devices}")
    if c.data.image_size < 0:
        raise ConfigError(f"data.image_size must be >= 0 (0 = the dataset's size), "
                          f"got {c.data.image_size!r}")
    text = c.model.get("text")
    if text is not None and text.get("enabled", False) and c.train.objective not in (
            TEXT_OBJECTIVES):
        raise ConfigError(f"model.text.enabled: train.objective {c.train.objective!r} does "
                          f"not train text-conditional models; use one of {TEXT_OBJECTIVES}")
    if c.train.sample_every or c.train.eval_every:
        _positive_int(c, "sample.num_samples")
        _positive_int(c, "sample.batch_size")
        _positive_int(c, "sample.num_steps")
