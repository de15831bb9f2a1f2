"""Training: the state and optimizer (`state`), the pure train step (`step`), the host
loop (`loop.train_and_evaluate`), sampling from params (`sampling`) and the `sample`
mode that draws images from a workdir's newest checkpoint (`generate`)."""
from diffusion.train.generate import sample_from_workdir
from diffusion.train.loop import train_and_evaluate

__all__ = ["sample_from_workdir", "train_and_evaluate"]
