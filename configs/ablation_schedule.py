"""Ablation: linear vs cosine noise schedule on Fashion-MNIST (same model and budget).

    python launch.py --config configs/ablation_schedule.py --workdir runs/schedule --sweep

runs one training per entry of `sweep()`, in runs/schedule/diffusion.schedule=linear
and runs/schedule/diffusion.schedule=cosine (`--sweep_print` prints one command per arm
for a job array; `--sweep_index=I` runs arm I only). Compare `loss_t*` (loss per
noise-level bucket) and the sample grids in TensorBoard (`tensorboard --logdir
runs/schedule`: each run is named by its folder, i.e. its overrides). Nichol & Dhariwal
(2021) report that cosine wastes fewer steps at high noise, which shows at few sampling
steps.
Tiny mode for tests: configs/ablation_schedule.py:runlocal
"""
from configs import default
from configs.base import is_tiny


def get_config(arg: str = ""):
    c = default.get_config(arg)
    if not is_tiny(arg):
        c.train.num_steps = 2000
        c.sample.num_steps = 20
    return c


def sweep():
    """Dotted-key overrides, one dict per run."""
    return [{"diffusion.schedule": name} for name in ("linear", "cosine")]
