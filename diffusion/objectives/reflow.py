"""Objective "reflow": rectified-flow reflow (2-rectified flow, Liu et al. 2023).

A trained flow model maps noise eps to samples x0 = ODE(eps); its pairs are written
once by `python -m diffusion.reflow_pairs` and read by the `pairs:FILE.npy` data source
(diffusion.data.pairs), whose batches carry image = x0 and noise = eps. Training on
these couplings, x_t = (1 - t) x0 + t eps with target u = eps - x0, straightens the
flow: the couplings are deterministic, so the lines from eps to x0 no longer cross in
expectation and few Euler steps follow them. The step is flow matching's
(`flow.make_flow_train_step` with coupled=True), on the `flow` section's path, time
sampling and weighting; `flow.init_workdir` (the flow run that made the pairs, as Liu
et al. do) starts it from that model's EMA params. It samples as a flow model.
"""
from __future__ import annotations

from diffusion.objectives.base import Objective, unchanged
from diffusion.objectives.flow import flow_denoiser, init_from_workdir, init_workdir, step_maker

REFLOW = Objective(step_maker(coupled=True), unchanged, init_from_workdir, flow_denoiser,
                   init_from=init_workdir)
