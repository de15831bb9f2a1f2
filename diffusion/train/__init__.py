"""Training, the top layer and the only one that reads a whole config: what a run
builds (`setup`), the host loop (`loop.train_and_evaluate`), evaluation during training
(`evaluator`), the `sample` mode that draws images from a workdir (`generate`), config
checks (`validate`, `run_config`). The state, the steps and the sampler glue live below
it (diffusion.train_state, diffusion.objectives, diffusion.sampling)."""
from diffusion.train.generate import sample_from_workdir
from diffusion.train.loop import train_and_evaluate

__all__ = ["sample_from_workdir", "train_and_evaluate"]
