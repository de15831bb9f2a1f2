"""A run's own config.json is the truth about what its checkpoints mean.

The resolved config is written to <workdir>/config.json when a run trains. Once the
workdir holds a finished checkpoint, the keys that give the parameters their meaning
(FROZEN: the model, the parameterisation and schedule, the data, the objective) are
fixed; restoring the checkpoints under other values would run to the end and give wrong
results without any error. So:

- Resume (training into a workdir with a checkpoint): every frozen key of the given
  config must equal config.json's; a difference is a ConfigError naming each key and
  both values, raised by `build_run` before anything is written. Everything else may
  change: train.num_steps (extend a run), optim.*, ema.*, the log / sample / checkpoint
  intervals, sample.*, eval.*, latent.*, data.global_batch_size, data.data_dir.
- Sample mode (`sample_config`): the run is sampled as it was trained. The config is
  config.json's, and the command line contributes the keys that are not frozen (sample.*,
  eval.*, latent.*, ...). An explicit override of a frozen key that differs from
  config.json is a ConfigError naming the key and both values; a frozen value that
  merely comes from the config *file* is replaced by config.json's (logged), so
  `--config` need not repeat the training overrides. A library caller that passes no
  `overrides` list gets the strict check of every frozen key.

A key that config.json does not record (the run predates it) takes the given config's
value: that is the default the older code behaved as.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Optional

import ml_collections

from diffusion.checkpointing import COMMIT_FILE
from diffusion.config_file import ConfigError, as_tuples, read_run_config

log = logging.getLogger(__name__)

# Keys (exact, or every key under a "section.") that fix what a checkpoint's parameters
# mean. data.data_dir (where the data lives) and consistency.teacher_workdir (where the
# teacher lives) name locations, not contents, and may move.
FROZEN = ("model.", "diffusion.", "consistency.", "vae_loss.", "train.objective",
          "conditioning.num_classes", "data.source", "data.split", "data.image_size",
          "data.random_flip", "seed")
MOVABLE = ("consistency.teacher_workdir",)
# Frozen on resume (they fix the training data stream) but meaningless for sampling:
# sample mode takes them from config.json without a check.
TRAINING_ONLY = ("seed", "data.split", "data.random_flip")

_MISSING = "<not set>"


def is_frozen(key: str) -> bool:
    if key in MOVABLE:
        return False
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in FROZEN)


def flatten(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{"a.b.c": value} of every leaf, lists as tuples."""
    d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flatten(v).items()})
        else:
            out[k] = as_tuples(v)
    return out


def has_checkpoint(workdir: str) -> bool:
    """Whether <workdir>/checkpoints holds a finished (committed) step."""
    ckpt = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckpt):
        return False
    return any(name.isdigit() and os.path.exists(os.path.join(ckpt, name, COMMIT_FILE))
               for name in os.listdir(ckpt))


def _differences(given: dict, saved: dict, keys: Iterable[str]) -> list[tuple]:
    """(key, saved value, given value) for each key whose two values differ; keys that
    config.json lacks are skipped (see the module docstring)."""
    out = []
    for key in sorted(keys):
        if key not in saved:
            continue
        mine = given.get(key, _MISSING)
        if mine != saved[key]:
            out.append((key, saved[key], mine))
    return out


def _lines(diffs: list[tuple]) -> str:
    return "; ".join(f"{k}: config.json has {s!r}, the given config {g!r}" for k, s, g in diffs)


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises ConfigError if `workdir` holds a finished checkpoint and config.json
    records a frozen key with another value than `config` (see the module docstring)."""
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not (os.path.isfile(path) and has_checkpoint(workdir)):
        return
    given, saved = flatten(config), flatten(read_run_config(workdir))
    diffs = _differences(given, saved, [k for k in set(given) | set(saved) if is_frozen(k)])
    if diffs:
        raise ConfigError(
            f"{workdir} holds checkpoints of a run whose config differs in keys that fix "
            f"what its parameters mean: {_lines(diffs)}. Resume with the run's own values "
            "(only training-length, optimizer, EMA, interval, sample.*, eval.* and "
            "latent.* keys may change), or train the changed config in a new workdir.")


def sample_config(config: Optional[ml_collections.ConfigDict], workdir: str,
                  overrides: Optional[Iterable[str]] = None) -> ml_collections.ConfigDict:
    """The config to sample the run in `workdir` with: config.json's, with the keys of
    `config` that are not frozen (sample.*, eval.*, latent.*, ...).

    overrides: the dotted keys set explicitly on the command line (launch.py passes
    them); only those frozen keys are checked against config.json, the others are taken
    from it. None: every frozen key of `config` is checked. config None: config.json as
    it is.
    """
    if config is not None and not os.path.isfile(os.path.join(workdir, "config.json")):
        log.warning("%s holds no config.json (a run older than launch.py's record of it): "
                    "sampling with the given config as it is", workdir)
        return config
    saved_cfg = read_run_config(workdir)
    if config is None:
        return saved_cfg
    given, saved = flatten(config), flatten(saved_cfg)
    checked = [k for k in (given if overrides is None else overrides)
               if is_frozen(k) and k not in TRAINING_ONLY]
    diffs = _differences(given, saved, checked)
    if diffs:
        raise ConfigError(
            f"{workdir} is sampled with the config it was trained with (its config.json), "
            f"but the command line changes keys that fix what its parameters mean: "
            f"{_lines(diffs)}. Drop those overrides; only sample.*, eval.*, latent.* and "
            "other non-model keys may differ.")
    ignored = _differences(given, saved, [k for k in given if is_frozen(k)])
    if ignored:
        log.info("sampling with the run's config.json, not the config file, for %s",
                 ", ".join(k for k, _, _ in ignored))
    merged = saved_cfg.to_dict()
    for key, value in given.items():
        if is_frozen(key) and key in saved:
            continue
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return ml_collections.ConfigDict(merged)
