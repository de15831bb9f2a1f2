"""`launch.py --mode sample` for a pretrained pipeline: a config whose `pretrained.path`
names a diffusers Stable Diffusion folder (configs/sd_text_to_image.py).

    python launch.py --config configs/sd_text_to_image.py --workdir runs/sd --mode sample \\
        --config.pretrained.path=/path/to/sd --config.sample.prompt="a red bicycle"

Config keys read (the top layer, like `diffusion.train`: nothing below reads a config):
  pretrained.path         the folder (load_stable_diffusion)
  sample.prompt           one prompt, or
  sample.prompts_file     a text file, one prompt a line (blank lines skipped)
  sample.negative_prompt  for every prompt ("" = none, i.e. the empty prompt)
  sample.num_samples      images per prompt
  sample.sampler, num_steps, guidance_scale, seed, eta (DDIM), batch_size (rows per call)
  sample.skip_type        "karras" = Karras sigmas for DPM-Solver++ (2M / 3M); anything
                          else = the scheduler config's timestep spacing
  sample.sigma_schedule   the same for Euler / Heun / Euler ancestral ("karras" or not)
  sample.options          any other sampler option, "k=v,..." ("dpmpp_2m.k=v": that
                          sampler only), over what the scheduler config gives
  sample.clip_skip        CLIP layers to skip for the prompt features (0 = none)
  data.image_size         height = width (0 = the U-Net's sample size times 8)
  model.dtype             activations: float32 | bfloat16

It writes into the workdir `samples_sd_<sampler>_<N>steps_seed<S>.npz` (arr_0 uint8
[P num, H, W, 3], arr_1 the prompt index of each image), the PNG grid of the same name
(one row per prompt) and `.json` with the prompts and settings.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import images, samplers
from diffusion.evaluation.sample_files import save_samples
from diffusion.stable_diffusion.pipeline import load_stable_diffusion
from diffusion.stable_diffusion.scheduler import KARRAS_SAMPLERS

log = logging.getLogger(__name__)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigValueError(ValueError):
    """A config value the pretrained sample mode cannot use; launch.py prints it."""
    exit_code = 2


def read_prompts(sample: ml_collections.ConfigDict) -> list[str]:
    """sample.prompts_file's lines, or [sample.prompt]."""
    if sample.prompts_file:
        with open(sample.prompts_file, encoding="utf-8") as fh:
            prompts = [line.strip() for line in fh if line.strip()]
        if not prompts:
            raise ConfigValueError(f"sample.prompts_file={sample.prompts_file!r} has no prompts")
        if sample.prompt:
            raise ConfigValueError("set sample.prompt or sample.prompts_file, not both")
        return prompts
    if not sample.prompt:
        raise ConfigValueError("text-to-image needs sample.prompt or sample.prompts_file")
    return [sample.prompt]


def _karras(sample: ml_collections.ConfigDict, name: str) -> Optional[bool]:
    if name not in KARRAS_SAMPLERS:
        return None
    key = "skip_type" if name.startswith("dpmpp") else "sigma_schedule"
    return sample[key] == "karras"


def _options(text: str, name: str) -> dict:
    """sample.options for sampler `name` ("k=v,..."; "sampler.k=v" for one sampler)."""
    out = {}
    for key, value in samplers.parse_options(text).items():
        scope, dot, option = key.rpartition(".")
        if not dot or samplers.canonical_name(scope) == name:
            out[option] = value
    return out


def sample_pretrained(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Samples config.pretrained.path with the config's prompts; returns the .npz path."""
    if not os.path.isdir(config.pretrained.path):
        raise ConfigValueError(f"pretrained.path={config.pretrained.path!r} is not a folder: "
                               "give a diffusers Stable Diffusion folder with "
                               "--config.pretrained.path=/path/to/sd")
    s = config.sample
    prompts = read_prompts(s)
    try:
        name = samplers.canonical_name(s.sampler)
        options = _options(s.options, name)
    except ValueError as e:
        raise ConfigValueError(f"sample.sampler / sample.options: {e}") from None
    if config.model.dtype not in DTYPES:
        raise ConfigValueError(f"model.dtype={config.model.dtype!r}; known: {sorted(DTYPES)}")
    eta = float(s.eta) if name == "ddim" else 0.0
    sd = load_stable_diffusion(config.pretrained.path, dtype=DTYPES[config.model.dtype])
    size = int(config.data.image_size) or None
    num = int(s.num_samples)
    u8 = sd.sample(prompts, s.negative_prompt or None, sampler=name, steps=int(s.num_steps),
                   guidance=float(s.guidance_scale), seed=int(s.seed), num=num,
                   height=size, width=size, karras=_karras(s, name), eta=eta,
                   clip_skip=int(s.clip_skip) or None, batch_size=int(s.batch_size),
                   **options)
    out = os.path.join(os.path.abspath(workdir),
                       f"samples_sd_{name}_{int(s.num_steps)}steps_seed{int(s.seed)}")
    if jax.process_index() == 0:
        save_samples(out + ".npz", u8, np.repeat(np.arange(len(prompts)), num))
        images.save_png(out + ".png", images.make_grid(u8, nrow=num))
        with open(out + ".json", "w", encoding="utf-8") as fh:
            json.dump(dict(path=config.pretrained.path, prompts=prompts,
                           negative_prompt=s.negative_prompt, sampler=name,
                           options=options, steps=int(s.num_steps),
                           guidance=float(s.guidance_scale), seed=int(s.seed),
                           images_per_prompt=num), fh, indent=1)
        log.info("wrote %s.npz, .png and .json", out)
    return out + ".npz"
