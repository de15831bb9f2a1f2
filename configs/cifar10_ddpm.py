"""DDPM on CIFAR-10 (Ho et al. 2020), the paper's setup.

    python -m diffusion.data.prepare --dataset cifar10 --data_dir ~/tensorflow_datasets
    python launch.py --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm

35.7M-parameter U-Net (ch 128, mults 1,2,2,2, 2 res blocks, attention at 16x16, dropout
0.1), linear betas 1e-4..0.02, T = 1000, eps prediction, Adam 2e-4 with 5000 warm-up
steps, batch 128, grad clip 1, EMA 0.9999, random flips, 800k steps. The paper reports
FID 3.17 (1000 ancestral steps); DDIM on the same model: 13.36 / 6.84 / 4.67 / 4.16 at
10 / 20 / 50 / 100 steps.
Tiny mode for tests: configs/cifar10_ddpm.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny


def get_config(arg: str = ""):
    c = get_base_config()
    c.data.source = "tfds:cifar10"
    c.data.random_flip = True
    c.data.global_batch_size = 128
    c.model.unet.update(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                        attn_resolutions=(16,), num_heads=1, dropout=0.1)
    c.diffusion.schedule = "linear"
    c.diffusion.T = 1000
    c.diffusion.pred_type = "eps"
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.decay = "constant"
    c.optim.grad_clip = 1.0
    c.ema.decay = 0.9999
    c.ema.warmup = False
    c.train.num_steps = 800_000
    c.train.log_every = 100
    c.train.checkpoint_every = 10_000
    c.train.sample_every = 10_000
    c.sample.sampler = "ddpm"
    c.sample.num_steps = 1000
    c.sample.variance = "large"
    if is_tiny(arg):
        make_tiny(c)
    return c
