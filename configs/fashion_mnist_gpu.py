"""Fashion-MNIST at 32x32 on one GPU: a bigger U-Net, bf16 activations, ~5 minutes.

    python launch.py --config configs/fashion_mnist_gpu.py --workdir runs/fmnist_gpu

What it should reach: clean samples of all ten classes after ~5 minutes on an H100
(about 20k steps at batch 256; steps/s recorded in BENCHMARKS.md once measured).
Tiny mode for tests: configs/fashion_mnist_gpu.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny


def get_config(arg: str = ""):
    c = get_base_config()
    c.data.source = "fashion_mnist_idx"
    c.data.image_size = 32
    c.data.global_batch_size = 256
    c.model.dtype = "bfloat16"
    c.model.unet.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                        num_heads=4, dropout=0.1)
    c.diffusion.schedule = "cosine"
    c.diffusion.pred_type = "v"  # eps on cosine breaks DDIM / DPM-Solver: see default.py
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 500
    c.optim.decay = "cosine"
    c.ema.decay = 0.9995
    c.train.num_steps = 20000
    c.train.log_every = 100
    c.train.checkpoint_every = 2500
    c.train.sample_every = 2500
    c.sample.num_samples = 100
    if is_tiny(arg):
        make_tiny(c)
    return c
