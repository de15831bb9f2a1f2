"""Training objectives: what a train step optimises, looked up by `train.objective`.

    diffusion                  eps / x0 / v prediction under a VP schedule (diffusion.py)
    edm                        EDM denoiser training in sigma space (edm.py)
    consistency_training       CT / iCT, no teacher (consistency.py)
    consistency_distillation   CD from a run of this codebase (consistency.py)
    vae                        the KL autoencoder of latent diffusion (vae.py)
    flow                       flow matching: velocity on a Gaussian path (flow.py)
    reflow                     rectified-flow reflow on (sample, noise) pairs (reflow.py)

An Objective (base.py) maps a run (its config, model, schedule, optimizer, and for CD
its teacher) to a pure train step and to the Denoiser that samplers call. Adding an
objective is one file and one line of OBJECTIVES below.
"""
from __future__ import annotations

from diffusion.objectives.base import Objective
from diffusion.objectives.consistency import CONSISTENCY_DISTILLATION, CONSISTENCY_TRAINING
from diffusion.objectives.diffusion import DIFFUSION
from diffusion.objectives.edm import EDM
from diffusion.objectives.flow import FLOW
from diffusion.objectives.reflow import REFLOW
from diffusion.objectives.vae import VAE

OBJECTIVES: dict[str, Objective] = {
    "diffusion": DIFFUSION,
    "edm": EDM,
    "consistency_training": CONSISTENCY_TRAINING,
    "consistency_distillation": CONSISTENCY_DISTILLATION,
    "vae": VAE,
    "flow": FLOW,
    "reflow": REFLOW,
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown train.objective {name!r}; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "get_objective"]
