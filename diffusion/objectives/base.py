"""What an objective is: the functions a run calls to train and to sample a network.

An Objective bundles
  make_step(run)          -> train_step(state, batch) -> (state, metrics), pure;
  init_aux(run, state)    -> state with `aux` filled (traced under eval_shape / jit);
  prepare(run, state)     -> state, on the host after a fresh init (e.g. a CD teacher's
                             params into aux; not called when resuming);
  denoiser(run, params)   -> the Denoiser that samplers call;
  visualize(run, state)   -> {tag: images}, optional: when set, the loop writes these
                             (uint8 grids [H, W, C], or [N, H, W, C] that it tiles)
                             instead of sample grids, e.g. a VAE's reconstructions;
  teacher                 whether the run needs a teacher: the layer above loads it
                             (`diffusion.load` of consistency.teacher_workdir, by shape)
                             and hands it over as `run.teacher`;
  init_from(config)       optional: a workdir ("" = none) that the layer above loads the
                             same way as `run.teacher`, for `prepare` to start from
                             (flow / reflow: flow.init_workdir).

`run` is anything with the attributes an objective reads: the config, model, schedule,
image_shape, num_classes and mesh (a train Run or a loaded Pipeline), plus tx, lr_fn,
source, state_sharding and teacher when training. Objectives import no training loop
and no loader: what they need is handed to them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional


class Objective(NamedTuple):
    make_step: Callable
    init_aux: Callable
    prepare: Callable
    denoiser: Callable
    visualize: Optional[Callable] = None
    teacher: bool = False
    init_from: Optional[Callable] = None


def unchanged(run, state):
    """init_aux / prepare of an objective that needs nothing beyond the TrainState."""
    return state


def check_not_learned_sigma(run) -> None:
    if run.config.diffusion.learned_sigma:
        raise ValueError(f"objective {run.config.train.objective!r} has no learned variance; "
                         "set diffusion.learned_sigma=False")
