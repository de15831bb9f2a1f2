"""A run's config.json, its one reader and writer, and the error a bad config value is.

`write_config` records the resolved config of a run in <workdir>/config.json when it
trains; `read_run_config` reads it back, lists as tuples again. Everything that turns a
workdir back into something usable (`diffusion.load`, resuming, sample mode, a CD
teacher, a latent run's VAE) starts from this file, so it sits below all of them.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key (launch.py prints the
    one line and exits with `exit_code`)."""
    exit_code = 2


def as_tuples(x: Any) -> Any:
    """JSON lists back to tuples (config.json stores tuples such as ch_mult as lists)."""
    if isinstance(x, dict):
        return {k: as_tuples(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(as_tuples(v) for v in x)
    return x


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to <workdir>/config.json (see write_config)."""
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} holds no config.json: is it the workdir of a "
                                "run trained with launch.py?")
    with open(path) as f:
        return ml_collections.ConfigDict(as_tuples(json.load(f)))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The resolved config, as JSON (machine) and as the ConfigDict repr (people)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
