"""EDM teacher on Fashion-MNIST (objective "edm"), sized for one H100 in minutes.

    python launch.py --config configs/edm_fashion_mnist.py --workdir runs/edm_fashion_mnist

What it should reach (expected, not yet measured: written without a GPU): the EDM loss
(lambda-weighted, so of order 1 early at every noise level) falls quickly over the first
few thousand steps and then slowly; 18-step Heun samples (35 network evaluations) show
recognisable Fashion-MNIST items. 20k steps at batch 128: minutes on one H100 (an
estimate), hours on 2 CPU cores (use :runlocal there). The workdir is
the teacher of configs/cd_fashion_mnist.py (same network, so CD can start from it).
Tiny mode for tests: configs/edm_fashion_mnist.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny
from diffusion.objectives.consistency_config import add_consistency_config


def fashion_unet(c) -> None:
    """The U-Net shared by the Fashion-MNIST EDM teacher and its CD / CT students."""
    c.model.unet.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,),
                        num_heads=4, dropout=0.1)


def get_config(arg: str = ""):
    c = add_consistency_config(get_base_config())
    c.train.objective = "edm"
    c.data.source = "fashion_mnist_idx"
    c.data.global_batch_size = 128
    fashion_unet(c)
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 500
    c.optim.decay = "cosine"
    c.ema.decay = 0.9995
    c.train.num_steps = 20000
    c.train.log_every = 100
    c.train.checkpoint_every = 2000
    c.train.sample_every = 5000
    c.sample.sampler = "heun"
    c.sample.num_steps = 18
    c.eval.sampler = "heun"
    c.eval.num_steps = 18
    if is_tiny(arg):
        make_tiny(c)
    return c
