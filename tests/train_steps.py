"""A shared test helper: run a few train steps of a built Run on its own data."""
from diffusion import parallel
from diffusion.data import BatchIterator
from diffusion.train import loop


def train_steps(run, state, n: int):
    """(losses [n], final state) after n steps of the run's jitted train step."""
    step = loop._train_step_fn(run)
    batches = BatchIterator(run.source, run.config.data.global_batch_size, 0,
                            image_size=run.image_shape[:2])
    losses = []
    for _ in range(n):
        state, metrics = step(state, parallel.global_batch(next(batches), run.mesh))
        losses.append(float(metrics["loss"]))
    return losses, state
