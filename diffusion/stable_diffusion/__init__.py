"""Stable Diffusion 1.x / 2.x from a diffusers folder, end to end in JAX.

    sd = load_stable_diffusion("/path/to/sd")     # unet/, text_encoder/, vae/, ...
    images = sd.sample("a red bicycle", "blurry", steps=25, guidance=7.5, seed=0)

`pipeline`: loading and sampling (text encoding, guided U-Net, every sampler, VAE
decoding); `scheduler`: the scheduler config as our schedule and sampler options;
`run`: the `launch.py --mode sample` entry for configs that set `pretrained.path`
(configs/sd_text_to_image.py).
"""
from diffusion.stable_diffusion.pipeline import StableDiffusion, load_stable_diffusion

__all__ = ["StableDiffusion", "load_stable_diffusion"]
