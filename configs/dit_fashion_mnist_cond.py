"""Class-conditional Fashion-MNIST with a small pixel-space DiT and classifier-free
guidance, sized for one H100 in about five minutes.

    python launch.py --config configs/dit_fashion_mnist_cond.py --workdir runs/dit_fmnist_cond

Setup: 28x28 images resized (bilinear) to 32x32x1; DiT with patch 2 (256 tokens),
hidden 256, depth 8, 4 heads (9.7M parameters, 3.8 GFLOPs forward per image);
bf16 activations; 10 classes, labels dropped to the null class with p = 0.1 so that
one network is both the conditional and the unconditional model. Cosine schedule, v
prediction; AdamW lr 3e-4 with warm-up and cosine decay; batch 256, 20k steps. Sample
grids: 100 EMA samples by 50 DDIM steps at guidance w = 2.0, one row per class
(T-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot).
Add --config.train.peak_tflops=989 (H100 SXM, dense bf16) to log MFU.
What it should reach: not measured yet (no GPU in the session that wrote it); expect
the loss to settle near that of configs/fashion_mnist_gpu.py and each grid row to show
its own class.
Args (big_vision style, comma-separated): `variant=B/2` trains a paper-sized DiT variant
(S/B/L/XL with patch 2/4/8) instead of the small one above; `runlocal` is the tiny mode,
e.g. `configs/dit_fashion_mnist_cond.py:variant=B/2,runlocal`.
Tiny mode for tests: configs/dit_fashion_mnist_cond.py:runlocal
"""
from configs.base import get_base_config, is_tiny, make_tiny, parse_arg

NUM_CLASSES = 10


def get_config(arg: str = ""):
    args = parse_arg(arg, variant="")
    c = get_base_config()
    c.data.source = "fashion_mnist_idx"
    c.data.image_size = 32                 # patch 2 on 32x32: a 16x16 grid of tokens
    c.data.global_batch_size = 256
    c.model.name = "dit"
    c.model.dtype = "bfloat16"
    c.model.dit.update(variant="S/2", hidden_size=256, depth=8, num_heads=4)
    if args.variant:  # the paper's sizes of that variant
        c.model.dit.update(variant=args.variant, hidden_size=0, depth=0, num_heads=0)
    c.conditioning.num_classes = NUM_CLASSES
    c.conditioning.label_dropout = 0.1
    c.diffusion.schedule = "cosine"
    c.diffusion.pred_type = "v"  # eps on cosine breaks DDIM / DPM-Solver: see default.py
    c.optim.update(lr=3e-4, warmup_steps=1000, decay="cosine", weight_decay=0.0,
                   grad_clip=1.0)
    c.ema.decay = 0.9995
    c.train.num_steps = 20000
    c.train.log_every = 100
    c.train.checkpoint_every = 5000
    c.train.sample_every = 5000
    c.sample.sampler = "ddim"
    c.sample.num_steps = 50
    c.sample.num_samples = 10 * NUM_CLASSES  # sample i has label i % 10: 10 per class
    c.sample.guidance_scale = 2.0
    if is_tiny(args):
        make_tiny(c)                       # synthetic 8x8 data with 10 classes
        c.model.dit.update(variant=args.variant or "S/2", hidden_size=32, depth=2,
                           num_heads=2)
        c.sample.num_samples = NUM_CLASSES
    return c
