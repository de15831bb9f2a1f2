"""The `sample` mode: load the newest checkpoint's EMA params, draw N images, write a
PNG grid and an `.npz` into the workdir in the layout of ADM's evaluator and DiT's
sample_ddp.py: `arr_0` uint8 [N, H, W, C] in the images' own channels, `arr_1` labels
[N] for class-conditional runs (diffusion.evaluation.sample_files)."""
from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Optional

import jax
import ml_collections
import numpy as np

from diffusion import images, samplers
from diffusion.evaluation.sample_files import save_samples
from diffusion.train import init_images, sampling
from diffusion.train.loop import sample_fn_for
from diffusion.train.run_config import sample_config
from diffusion.train.setup import build_run

log = logging.getLogger(__name__)


def sample_from_workdir(config: Optional[ml_collections.ConfigDict], workdir: str,
                        overrides: Optional[Iterable[str]] = None) -> str:
    """Samples workdir's newest checkpoint; returns the .npz path.

    The run is sampled as it was trained: the config is the run's config.json with the
    sampling keys of `config` (sample.*, eval.*, latent.*; see
    diffusion.train.run_config.sample_config). `overrides` lists the keys set explicitly
    on the command line; a model / parameterisation / data key among them that differs
    from config.json is an error. With overrides=None every such key of `config` must
    match; with config=None config.json is used as it is.
    """
    config = sample_config(config, workdir, overrides)
    run = build_run(config, workdir)
    # sample.init_images / sample.mask / sample.strength (image-to-image, inpainting):
    # read and checked before the checkpoint is.
    x_init, mask = init_images.load_sample_inputs(run.config.sample, run.image_shape)
    step = run.checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run.workdir}/checkpoints: train first "
                                f"with `python launch.py --config ... --workdir {workdir}`")
    # The newest checkpoint that restores (a corrupt one is skipped with a warning, and
    # left where it is: sampling never changes a run's checkpoints).
    step, state, _ = run.checkpointer.restore_latest(run.abstract_state)
    s = run.config.sample
    n_dev = run.mesh.devices.size
    bs = int(math.ceil(min(s.batch_size, s.num_samples) / n_dev) * n_dev)
    fn = sample_fn_for(run, s.sampler, s.num_steps, bs)
    x = sampling.generate(fn, state.ema_params, jax.random.key(s.seed), s.num_samples, bs,
                          s.guidance_scale, x_init=x_init, mask=mask)
    labels = np.arange(s.num_samples) % run.num_classes if run.num_classes else None
    name = f"samples_{samplers.canonical_name(s.sampler)}_{s.num_steps}steps_step{step}"
    out = os.path.join(run.workdir, name)
    if jax.process_index() == 0:
        u8 = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        save_samples(out + ".npz", u8, labels)
        images.save_png(out + ".png", images.make_grid(x))
        log.info("wrote %s.npz and .png", out)
    run.checkpointer.close()
    return out + ".npz"
