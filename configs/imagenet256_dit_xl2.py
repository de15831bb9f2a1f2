"""DiT-XL/2 on ImageNet 256x256 latents (Peebles & Xie 2023), the paper's setup.

    # 1. ImageNet in tfds format (manual download: put ILSVRC2012_img_train.tar and
    #    ILSVRC2012_img_val.tar in ~/tensorflow_datasets/downloads/manual/ first)
    python -m diffusion.data.prepare --dataset imagenet2012 --data_dir ~/tensorflow_datasets
    # 2. Encode once with SD's VAE (diffusers stabilityai/sd-vae-ft-ema: config.json +
    #    diffusion_pytorch_model.safetensors; scale 0.18215 from its config)
    python -m diffusion.autoencoder.encode --vae /data/sd-vae-ft-ema \\
        --source tfds:imagenet2012 --data_dir ~/tensorflow_datasets --image_size 256 \\
        --out /data/imagenet256_latents --batch_size 256 --dtype float16
    # 3. Train (resumes from the newest checkpoint in the workdir)
    python launch.py --config configs/imagenet256_dit_xl2.py --workdir runs/imagenet256_dit_xl2 \\
        --config.data.source=latents:/data/imagenet256_latents \\
        --config.latent.vae_weights=/data/sd-vae-ft-ema

Setup: 256x256 images (center crop + resize) -> 32x32x4 latents, z = 0.18215 * mean
of the posterior (encoded once, without flips); DiT-XL/2 (675M parameters, 118.6
GFLOPs), learned sigma (hybrid loss, lambda * T = 1), linear betas 1e-4..0.02, T=1000,
eps prediction; 1000 classes with label dropout 0.1 for classifier-free guidance;
AdamW lr 1e-4 constant, no weight decay, no warm-up, no clipping; batch 256; EMA 0.9999
(no warm-up). Samples: 250 DDPM steps with the learned variance, guidance 1.5, decoded
by the same VAE.
What it should reach (the paper's figures): FID-50K 19.5 at 400k steps without
guidance; 2.27 with guidance 1.5 after 7M steps. Neither measured here.
Tiny mode for tests (pixel-space, synthetic data, no VAE): configs/imagenet256_dit_xl2.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny


def get_config(arg: str = ""):
    c = get_base_config()
    c.data.source = "latents:/data/imagenet256_latents"
    c.data.image_size = 0                  # the latents' own 32x32
    c.data.random_flip = False             # flips belong before encoding
    c.data.global_batch_size = 256
    c.latent.vae_weights = "/data/sd-vae-ft-ema"
    c.model.name = "dit"
    c.model.dit.variant = "XL/2"
    c.conditioning.num_classes = 1000
    c.conditioning.label_dropout = 0.1
    c.diffusion.schedule = "linear"
    c.diffusion.T = 1000
    c.diffusion.pred_type = "eps"
    c.diffusion.learned_sigma = True
    c.diffusion.vlb_weight = 0.001         # times T: DiT's L_simple + L_vlb
    c.optim.update(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0,
                   grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8)
    c.ema.decay = 0.9999
    c.ema.warmup = False
    c.train.num_steps = 400_000
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.sample_every = 20_000
    c.sample.sampler = "ddpm"
    c.sample.variance = "learned"
    c.sample.num_steps = 250
    # DiT samples with improved-diffusion's respacing, space_timesteps(1000, "250"):
    # indices round(k * 999 / 249), 0 and 999 included (the default trailing grid would
    # visit 999, 995, ..., 3 and never the first trained step). Eval uses it too.
    c.sample.spacing = "iddpm"
    c.sample.num_samples = 64
    c.sample.guidance_scale = 1.5
    # As the paper's sampler (forward_with_cfg): guide eps channels 0-2 of the 4 latent
    # channels, the 4th and the variance conditional.
    c.sample.guidance_channels = 3
    c.sample.clip_x0 = 0.0                 # latents are not confined to [-1, 1]
    c.eval.sampler = "ddpm"
    c.eval.num_steps = 250
    c.eval.feature_net = "inception"
    if is_tiny(arg):
        make_tiny(c)
        c.conditioning.num_classes = 10    # the synthetic source's classes
        c.latent.vae_weights = ""          # synthetic pixels: nothing to decode
        c.sample.clip_x0 = 1.0
    return c
