"""Text to image with Stable Diffusion 1.x / 2.x weights from a diffusers folder:

    python launch.py --config configs/sd_text_to_image.py --workdir runs/sd --mode sample \\
        --config.pretrained.path=/path/to/stable-diffusion-v1-5 \\
        --config.sample.prompt="a photo of an astronaut riding a horse on mars" \\
        --config.sample.negative_prompt="blurry, low quality"

The folder is what `StableDiffusionPipeline.save_pretrained` writes (model_index.json,
unet/, text_encoder/, vae/, tokenizer/, scheduler/scheduler_config.json); nothing is
trained. DPM-Solver++ 2M with Karras sigmas ("DPM++ 2M Karras"), 25 steps, guidance 7.5,
512 x 512 (data.image_size; 768 for SD 2 v), 4 images per prompt (sample.num_samples);
`--config.sample.prompts_file=prompts.txt` takes one prompt a line instead of
sample.prompt. Writes runs/sd/samples_sd_dpmpp_2m_25steps_seed0.{npz,png,json}: a grid
with one row per prompt; see diffusion/stable_diffusion/run.py for every key it reads.
What it should reach: diffusers' images for the same latents (tests/test_stable_diffusion.py
checks that to 1e-3 on tiny random pipelines); SD 1.5 at 512 x 512 takes a few seconds
an image on one GPU after the compile (not yet measured here).
Tiny mode for tests (64 x 64, 2 steps, one image): configs/sd_text_to_image.py:runlocal
"""
from configs.base import get_base_config, is_tiny


def get_config(arg: str = ""):
    c = get_base_config()
    c.pretrained.path = "REQUIRED"          # a diffusers SD 1.x / 2.x folder
    c.data.image_size = 512                 # 0 = the U-Net's sample size times 8
    c.model.dtype = "float32"               # bfloat16 halves memory and time on GPUs
    c.sample.prompt = ""
    c.sample.negative_prompt = ""
    c.sample.prompts_file = ""
    c.sample.sampler = "dpmpp_2m"
    c.sample.skip_type = "karras"           # DPM++ 2M Karras; else the scheduler's spacing
    c.sample.sigma_schedule = "karras"      # the same for euler / heun / euler_a
    c.sample.num_steps = 25
    c.sample.guidance_scale = 7.5
    c.sample.num_samples = 4                # images per prompt
    c.sample.batch_size = 4                 # images per sampling call, over all devices
    c.sample.seed = 0
    c.sample.clip_skip = 0
    if is_tiny(arg):
        c.data.image_size = 64
        c.sample.num_steps = 2
        c.sample.num_samples = 1
        c.sample.batch_size = 1
    return c
