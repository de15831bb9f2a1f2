"""Ablation: linear vs cosine noise schedule on Fashion-MNIST (same model and budget).

    python launch.py --config configs/ablation_schedule.py --workdir runs/schedule --sweep

runs one training per entry of `sweep()`, in runs/schedule/schedule=linear and
runs/schedule/schedule=cosine. Compare `loss_t*` (loss per noise-level bucket) and the
sample grids in TensorBoard (`tensorboard --logdir runs/schedule`). Nichol & Dhariwal
(2021) report that cosine wastes fewer steps at high noise, which shows at few
sampling steps.
Tiny mode for tests: configs/ablation_schedule.py:runlocal
"""
from configs import default


def get_config(arg: str = ""):
    c = default.get_config(arg)
    c.train.num_steps = 2000 if not arg else c.train.num_steps
    c.sample.num_steps = 20 if not arg else c.sample.num_steps
    return c


def sweep():
    """Dotted-key overrides, one dict per run."""
    return [{"diffusion.schedule": name} for name in ("linear", "cosine")]
