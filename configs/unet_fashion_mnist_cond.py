"""Class-conditional Fashion-MNIST with the U-Net and classifier-free guidance, on one
GPU in about five minutes: the U-Net counterpart of configs/dit_fashion_mnist_cond.py.

    python launch.py --config configs/unet_fashion_mnist_cond.py --workdir runs/unet_fmnist_cond

Setup: configs/fashion_mnist_gpu.py (32x32, ch 64, mults 1,2,2, attention at 8x8,
bf16) plus a 10-class label embedding (ADM-style, added to the time embedding) with
label dropout 0.1; samples by 50 DDIM steps at guidance w = 2.0, one row per class.
What it should reach: not measured yet (no GPU in the session that wrote it); expect
each grid row to show its own class.
Tiny mode for tests: configs/unet_fashion_mnist_cond.py:runlocal
"""
from configs.base import is_tiny
from configs.fashion_mnist_gpu import get_config as get_unconditional_config

NUM_CLASSES = 10


def get_config(arg: str = ""):
    is_tiny(arg)  # rejects unknown arguments before anything else
    c = get_unconditional_config(arg)
    c.conditioning.num_classes = NUM_CLASSES
    c.conditioning.label_dropout = 0.1
    # Sample i has label i % 10: ten per class, one per class in tiny mode.
    c.sample.num_samples = NUM_CLASSES if is_tiny(arg) else 10 * NUM_CLASSES
    c.sample.guidance_scale = 2.0
    return c
