"""CIFAR-10 improved consistency training, iCT (Song & Dhariwal 2023).

    python launch.py --config configs/ict_cifar10.py --workdir runs/ict_cifar10

The paper's iCT (NCSN++, 56M parameters): FID 2.83 (1 step) / 2.46 (2 steps; iCT-deep
2.51 / 2.24), unconditional. Recipe: no teacher, target = stop_grad(online) (no EMA),
pseudo-Huber c = 0.00054 sqrt(3072) = 0.03, lognormal pairs (P_mean -1.1, P_std 2.0),
lambda = 1 / (sigma_{n+1} - sigma_n), N doubling from 11 to 1281 (s0 10, s1 1280),
dropout 0.3, batch 1024, Adam lr 1e-4, EMA 0.99993 for sampling, 400k steps; 2-step
sampling at the intermediate level sigma = 0.821. Differences here: our U-Net at
DDPM++'s size instead of NCSN++ (and its sinusoidal time embedding instead of
NCSN++'s Fourier features with scale 0.02), no measured result yet.
Tiny mode for tests: configs/ict_cifar10.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny
from configs.cd_cifar10 import cifar10_unet
from diffusion.objectives.consistency_config import add_consistency_config


def get_config(arg: str = ""):
    c = add_consistency_config(get_base_config())
    c.train.objective = "consistency_training"
    c.data.source = "tfds:cifar10"
    c.data.random_flip = True
    c.data.global_batch_size = 1024
    cifar10_unet(c, dropout=0.3)
    c.consistency.update(curriculum="ict", s0=10, s1=1280, target_ema_schedule="none",
                         index_sampling="lognormal", index_p_mean=-1.1, index_p_std=2.0,
                         weighting="inverse_step", distance="pseudo_huber", huber_c=0.0)
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.decay = "constant"
    c.optim.grad_clip = 0.0
    c.ema.decay = 0.99993
    c.ema.warmup = False
    c.train.num_steps = 400000
    c.train.log_every = 100
    c.train.checkpoint_every = 10000
    c.train.sample_every = 20000
    c.sample.sampler = "consistency"
    c.sample.num_steps = 1
    # The papers' 2-step sampling: --config.sample.num_steps=2
    # --config.sample.consistency_sigmas='(0.821,)'
    c.eval.sampler = "consistency"
    c.eval.num_steps = 1
    c.eval.feature_net = "inception"
    if is_tiny(arg):
        make_tiny(c)
    return c
