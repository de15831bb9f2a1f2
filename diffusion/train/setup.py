"""Everything a run builds from its config before the first step: mesh, data source,
schedule, model, optimizer, objective (and the CD teacher it needs), abstract state,
checkpoints.

The abstract state comes from `jax.eval_shape`, so a model that cannot take the data's
image shape fails here, in seconds, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections

from diffusion import parallel, pretrained
from diffusion.checkpointing import Checkpointer
from diffusion.config_file import read_run_config
from diffusion.data import Source, make_source
from diffusion.models import build_model
from diffusion.models import text_conditional
from diffusion.objectives import get_objective
from diffusion.objectives.consistency_config import section as consistency_section
from diffusion.schedules import Schedule, make_schedule
from diffusion.train import run_config, validate
from diffusion.train_state import init_state, make_optimizer


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    source: Source
    image_shape: tuple
    num_classes: int
    schedule: Schedule
    model: Any
    tx: Any
    lr_fn: Any
    init_fn: Any
    objective: Any        # diffusion.objectives.Objective
    abstract_state: Any   # ShapeDtypeStructs carrying their target shardings
    state_sharding: Any
    checkpointer: Checkpointer
    teacher: Any = None   # objective.teacher: a diffusion.pretrained.Pipeline, by shape


def image_shape_of(config: ml_collections.ConfigDict, source: Source) -> tuple:
    h, w, c = source.image_shape
    if config.data.image_size:
        h = w = int(config.data.image_size)
    return (h, w, c)


def build_run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Run:
    """Builds the run on `devices` (default: every device of the job)."""
    workdir = os.path.abspath(workdir)
    mesh = parallel.make_mesh(devices)
    validate.check_config(config, mesh.devices.size)  # first: one line naming the key
    # A trained workdir's config.json fixes the model: refuse another before writing.
    run_config.check_workdir(config, workdir)
    source = make_source(config.data.source, config.data.split, config.data.data_dir or None,
                         **text_conditional.source_options(config.model))
    text_conditional.check_caption_source(config.model, source, config.data.source)
    image_shape = image_shape_of(config, source)
    num_classes = int(config.conditioning.num_classes)
    if num_classes > 0 and source.num_classes and num_classes != source.num_classes:
        raise ValueError(f"conditioning.num_classes={num_classes} but data source "
                         f"{config.data.source!r} has {source.num_classes} classes")
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.T,
                             config.diffusion.zero_terminal_snr)
    model = build_model(config.model, image_shape, num_classes, config.diffusion.learned_sigma)
    tx, lr_fn = make_optimizer(config.optim, config.train.num_steps,
                               text_conditional.frozen_subtrees(config.model))
    objective = get_objective(config.train.objective)
    teacher = None
    if objective.teacher:
        teacher = load_teacher(config, image_shape, list(mesh.devices.flat))
    elif objective.init_from is not None and objective.init_from(config):
        teacher = load_teacher(config, image_shape, list(mesh.devices.flat),
                               objective.init_from(config))
    run = Run(config, workdir, mesh, source, image_shape, num_classes, schedule, model, tx,
              lr_fn, None, objective, None, None, None, teacher)

    def init_fn(key):
        state = init_state(model, tx, key, image_shape=image_shape, num_classes=num_classes)
        return objective.init_aux(run, state)
    key = jax.random.key(config.seed)
    try:  # the model's own shape checks, by shape only: seconds, before any compile
        jax.eval_shape(functools.partial(init_state, model, tx, image_shape=image_shape,
                                         num_classes=num_classes), key)
    except ValueError as e:
        raise ValueError(f"model {config.model.name!r} cannot take images of shape "
                         f"{image_shape}: {e}") from e
    abstract = jax.eval_shape(init_fn, key)
    # Replicated, or FSDP-style (train.fsdp): large arrays split over the `data` axis.
    state_sharding = parallel.state_sharding(abstract, mesh, bool(config.train.fsdp))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sharding)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
    return dataclasses.replace(run, init_fn=init_fn, abstract_state=abstract,
                               state_sharding=state_sharding, checkpointer=ckpt)


def load_teacher(config: ml_collections.ConfigDict, image_shape: tuple,
                 devices, workdir: str = "") -> pretrained.Pipeline:
    """The run in `workdir` (default consistency.teacher_workdir; an objective's
    `init_from`), built by shape from its config.json over
    `devices` (its EMA params are restored by the objective's `prepare` on a fresh run;
    a resumed run finds them in its own checkpoint). A teacher whose config does not
    tell its image shape (a `tfds:` source) is built for the student's `image_shape`."""
    named = "consistency.teacher_workdir={!r}" if not workdir else "the run to start from ({!r})"
    workdir = workdir or consistency_section(config).teacher_workdir
    if not workdir:
        raise ValueError(
            "consistency.teacher_workdir is empty: consistency distillation needs a teacher "
            "trained by this codebase, e.g. `python launch.py --config "
            "configs/edm_fashion_mnist.py --workdir runs/edm_fashion_mnist`, then "
            "--config.consistency.teacher_workdir=runs/edm_fashion_mnist")
    workdir = os.path.abspath(workdir)
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(
            f"{named.format(workdir)} holds no config.json: is it the "
            "workdir of a finished training run of this codebase?")
    h, _, c = pretrained.config_image_shape(read_run_config(workdir), workdir)
    shape = None if (h is not None and c is not None) else image_shape
    return pretrained.load(workdir, image_shape=shape, devices=devices, restore=False)
