"""The `sample` mode: draw N images from a workdir's newest checkpoint that restores.

The run is loaded as a library object (`diffusion.load`: its config.json and the EMA
params alone, no dataset, optimizer state or teacher) and sampled with the sampling keys
of the command line. It writes a PNG grid and an `.npz` into the workdir in the layout
of ADM's evaluator and DiT's sample_ddp.py: `arr_0` uint8 [N, H, W, C] in the images'
own channels, `arr_1` labels [N] for class-conditional runs
(diffusion.evaluation.sample_files). A text-conditional run draws sample.num_samples
images for each prompt of sample.prompt / sample.prompts_file (sample.negative_prompt
the unconditional branch of guidance, weight sample.guidance_scale), as a Stable
Diffusion folder does: prompt-major, one grid row per prompt; `.prompts.txt` beside the
`.npz` lists the rows (prompt, a tab, its negative prompt).
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

import jax
import ml_collections
import numpy as np

from diffusion import images, pretrained, samplers, sampling
from diffusion.evaluation.sample_files import save_samples
from diffusion.train import init_images, validate
from diffusion.train.run_config import sample_config

log = logging.getLogger(__name__)


def sample_from_workdir(config: Optional[ml_collections.ConfigDict], workdir: str,
                        overrides: Optional[Iterable[str]] = None) -> str:
    """Samples workdir's newest checkpoint that restores; returns the .npz path.

    The run is sampled as it was trained: the config is the run's config.json with the
    sampling keys of `config` (sample.*, eval.*, latent.*; see
    diffusion.train.run_config.sample_config). `overrides` lists the keys set explicitly
    on the command line; a model / parameterisation / data key among them that differs
    from config.json is an error. With overrides=None every such key of `config` must
    match; with config=None config.json is used as it is.
    """
    workdir = os.path.abspath(workdir)
    config = sample_config(config, workdir, overrides)
    validate.check_config(config, jax.device_count())
    if not pretrained.finished_steps(workdir):
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train first "
                                f"with `python launch.py --config ... --workdir {workdir}`")
    pipe = pretrained.load(workdir, config=config, restore=False)  # by shape: seconds
    # sample.init_images / sample.mask / sample.strength (image-to-image, inpainting):
    # read and checked before the checkpoint is.
    x_init, mask = init_images.load_sample_inputs(config.sample, pipe.image_shape)
    # The newest checkpoint that restores (a corrupt one is skipped with a warning, and
    # left where it is: sampling never changes a run's checkpoints).
    pipe = pipe.restore()
    s = config.sample
    text, num = {}, int(s.num_samples)
    if pipe.is_text:
        prompts, negatives = sampling.config_prompts(s)
        text = dict(prompt=prompts, negative_prompt=negatives)  # num images per prompt
    x = pipe.sample(s.sampler, int(s.num_steps), num, seed=int(s.seed),
                    batch_size=int(s.batch_size), x_init=x_init, mask=mask, **text)
    labels = np.arange(s.num_samples) % pipe.num_classes if pipe.num_classes else None
    name = (f"samples_{samplers.canonical_name(s.sampler)}_{s.num_steps}steps_"
            f"step{pipe.step}")
    out = os.path.join(workdir, name)
    if jax.process_index() == 0:
        u8 = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
        save_samples(out + ".npz", u8, labels)
        images.save_png(out + ".png", images.make_grid(x, num if text else None))
        if text:
            with open(out + ".prompts.txt", "w", encoding="utf-8") as f:
                f.writelines(f"{p}\t{n}\n" for p, n in zip(prompts, negatives))
        log.info("wrote %s.npz and .png", out)
    return out + ".npz"
