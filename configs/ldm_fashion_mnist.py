"""Latent diffusion on Fashion-MNIST: a class-conditional DiT-S/2 on the 8x8x4 latents
of configs/vae_fashion_mnist.py. Three steps:

    python launch.py --config configs/vae_fashion_mnist.py --workdir runs/vae_fashion_mnist
    python -m diffusion.autoencoder.encode --vae runs/vae_fashion_mnist \\
        --source fashion_mnist_idx --image_size 32 --out runs/fmnist_latents
    python launch.py --config configs/ldm_fashion_mnist.py --workdir runs/ldm_fashion_mnist

The second step encodes the 60k training images once (posterior means, scaled by
1/std measured on the data); this run trains on them and decodes its samples with the
VAE's EMA params (sample grids in <workdir>/samples and `--mode sample` are 32x32
images). Latents are not clipped to [-1, 1] while sampling (sample.clip_x0=0).
What it should reach (an estimate, not yet measured on a GPU): the loss falls to
~0.3-0.4 (eps MSE on latents) within a few thousand steps; guided samples (w=2) show
each class in order after 30k steps at batch 256, minutes on one GPU.
Tiny mode for tests (pixel-space, synthetic data, no VAE): configs/ldm_fashion_mnist.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny


def get_config(arg: str = ""):
    c = get_base_config()
    c.data.source = "latents:runs/fmnist_latents"
    c.data.image_size = 0                  # the latents' own 8x8
    c.data.global_batch_size = 256
    c.latent.vae_workdir = "runs/vae_fashion_mnist"
    c.model.name = "dit"
    c.model.dit.variant = "S/2"
    c.conditioning.num_classes = 10
    c.conditioning.label_dropout = 0.1
    c.diffusion.schedule = "linear"
    c.diffusion.T = 1000
    c.diffusion.pred_type = "eps"
    c.optim.update(lr=3e-4, warmup_steps=500, decay="cosine", weight_decay=0.0,
                   grad_clip=1.0)
    c.ema.decay = 0.9995
    c.train.num_steps = 30000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.sample_every = 5000
    c.sample.sampler = "ddim"
    c.sample.num_steps = 50
    c.sample.num_samples = 100
    c.sample.guidance_scale = 2.0
    c.sample.clip_x0 = 0.0                 # latents are not confined to [-1, 1]
    if is_tiny(arg):
        make_tiny(c)
        c.latent.vae_workdir = ""          # synthetic pixels: nothing to decode
        c.sample.clip_x0 = 1.0
    return c
