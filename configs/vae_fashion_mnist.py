"""KL autoencoder (f=4) for latent diffusion on Fashion-MNIST (train.objective "vae").

    python launch.py --config configs/vae_fashion_mnist.py --workdir runs/vae_fashion_mnist

32x32x1 images -> 8x8x4 latents (f=4: widths 64, 128, 128), LDM's loss: L1
reconstruction + 1e-6 KL, and a PatchGAN with the adaptive weight from step 10k. 20k
steps at batch 64, sized for one GPU in minutes (on 2 CPU cores use :runlocal).
What it should reach (an estimate, not yet measured on a GPU): PSNR on the training
batches above ~27 dB and SSIM above ~0.9 (logged as `psnr`, `ssim`); reconstructions in
<workdir>/samples keep the garments' outlines and stripes. The workdir is the VAE of
configs/ldm_fashion_mnist.py. Reconstruction FID on the test split afterwards:
    python -m diffusion.autoencoder.evaluate --workdir runs/vae_fashion_mnist
Tiny mode for tests: configs/vae_fashion_mnist.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny


def get_config(arg: str = ""):
    c = get_base_config()
    c.train.objective = "vae"
    c.model.name = "vae"
    c.model.vae.update(latent_channels=4, block_out_channels=(64, 128, 128),
                       layers_per_block=1, norm_num_groups=32, mid_attention=True)
    c.data.source = "fashion_mnist_idx"
    c.data.image_size = 32
    c.data.global_batch_size = 64
    c.vae_loss.update(rec_kind="l1", kl_weight=1e-6, disc=True, disc_start=10000,
                      disc_weight=0.5, disc_channels=64, disc_layers=2, disc_norm="group")
    # LDM trains both networks with Adam(0.5, 0.9) and no clipping.
    c.optim.update(lr=2e-4, b1=0.5, b2=0.9, warmup_steps=500, decay="constant",
                   grad_clip=0.0, weight_decay=0.0)
    c.ema.decay = 0.999
    c.train.num_steps = 20000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.sample_every = 2500
    c.sample.num_samples = 32     # examples reconstructed in each grid
    if is_tiny(arg):
        make_tiny(c)
        c.model.vae.update(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
        c.vae_loss.update(disc_channels=8, disc_layers=1, disc_start=2)
        c.optim.update(lr=1e-3, warmup_steps=0)  # visible progress within 4 steps
        c.sample.num_samples = 4
    return c
