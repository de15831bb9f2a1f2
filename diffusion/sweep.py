"""Sweeps: a config file's `sweep()` expanded into named arms, for launch.py.

A config file may define `sweep()` returning a list of dicts of dotted overrides, one
dict per arm (`[{"diffusion.schedule": "linear"}, {"diffusion.schedule": "cosine"}]`).
Each arm is named by its full dotted overrides (`diffusion.schedule=cosine`), so two
leaves of the same name in different sections (`diffusion.weighting` and
`consistency.weighting`) never share a folder; the name is the arm's sub-directory of the
workdir and so its run name in TensorBoard. An arm can run alone (`--sweep_index=I`),
and `sweep_commands` prints one command per arm for a job array. Imports no JAX.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import shlex
from typing import Any, Sequence

import ml_collections

Arm = tuple[str, ml_collections.ConfigDict]


def _load_module(config_path: str):
    """The config file as a module; the path may carry `:ARGS` as --config gives it."""
    path = config_path.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("_sweep_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load the config file {path!r} for its sweep()")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arm_name(overrides: dict[str, Any]) -> str:
    """`key=value` per override, full dotted keys, joined by ','; safe as a folder name."""
    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    # "/" would nest folders (variant=B/2) and blanks come from tuples: neither in a name.
    return re.sub(r"[^\w.,=+\-]", "_", name.replace(" ", ""))


def _apply(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        parent = config
        for part in key.split(".")[:-1]:
            if part not in parent:
                raise KeyError(f"sweep override {key!r}: no key {part!r} in the config")
            parent = parent[part]
        leaf = key.split(".")[-1]
        if leaf not in parent:
            raise KeyError(f"sweep override {key!r}: no key {leaf!r} in the config")
        parent[leaf] = value


def sweep_runs(config_path: str, config: ml_collections.ConfigDict) -> list[Arm]:
    """(name, config) per entry of the config file's sweep(), in order."""
    module = _load_module(config_path)
    if not hasattr(module, "sweep"):
        raise ValueError(f"--sweep given but {config_path.split(':', 1)[0]} defines no sweep()")
    runs = []
    for overrides in module.sweep():
        cfg = copy.deepcopy(config)
        _apply(cfg, overrides)
        runs.append((arm_name(overrides), cfg))
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep() of {config_path} repeats an arm: {names}")
    return runs


def select_arms(runs: list[Arm], index: int) -> list[Arm]:
    """All arms for index < 0, else only arm `index`."""
    if index < 0:
        return runs
    if index >= len(runs):
        raise ValueError(f"--sweep_index={index} is out of range: the sweep has {len(runs)} "
                         f"arms (0..{len(runs) - 1})")
    return [runs[index]]


def sweep_commands(argv: Sequence[str], runs: list[Arm], python: str = "python") -> list[str]:
    """One shell command per arm: this command line without --sweep_print, plus
    --sweep_index=I, with the arm's name as a comment (for a job array)."""
    keep, skip = [], False
    for a in argv[1:]:
        if skip or re.fullmatch(r"--(no)?sweep_print(=.*)?|--sweep_index=.*", a):
            skip = False
            continue
        skip = a == "--sweep_index"  # its value is the next argument
        if not skip:
            keep.append(a)
    return [f"{shlex.join([python, argv[0], *keep, f'--sweep_index={i}'])}  # {name}"
            for i, (name, _) in enumerate(runs)]
