"""Trains the small feature classifier used for offline FID on Fashion-MNIST.

    python -m diffusion.evaluation.train_classifier \
        --out diffusion/evaluation/assets/fmnist_classifier.msgpack

Defaults (2 epochs, batch 128, Adam 2e-3 with cosine decay to 0, no augmentation)
take under 3 minutes on 2 busy CPU cores and reach 89.5% test accuracy (seed 0).
Data: the project's data layer (`make_source("fashion_mnist_idx")`, Debian's
dataset-fashion-mnist IDX files).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from diffusion import cli
from diffusion.data import BatchIterator, make_source
from diffusion.evaluation.classifier import SmallClassifier, save_classifier

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("out", "diffusion/evaluation/assets/fmnist_classifier.msgpack",
                    "Where to write the classifier's params (.msgpack).", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 2, "Passes over the training split.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 128, "Images per step.", flag_values=FLAGS)
flags.DEFINE_float("learning_rate", 2e-3, "Adam's peak rate (cosine decay to 0).",
                   flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Initialisation and data order.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", None, "IDX directory (default: Debian's).", flag_values=FLAGS)


def _make_step(model: SmallClassifier, tx: optax.GradientTransformation):
    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def accuracy(model: SmallClassifier, params: Any, source_name: str = "fashion_mnist_idx",
             split: str = "test", batch_size: int = 1000, data_dir: str | None = None
             ) -> float:
    """Top-1 accuracy of the classifier on a whole split."""
    source = make_source(source_name, split=split, data_dir=data_dir)
    batches = BatchIterator(source, batch_size, seed=0, shuffle=False, num_epochs=1,
                            drop_remainder=False)
    predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x)["logits"], -1))
    correct = total = 0
    for batch in batches:
        correct += int(np.sum(np.asarray(predict(params, batch["image"])) == batch["label"]))
        total += len(batch["label"])
    return correct / total


def train(out_path: str, epochs: int = 2, batch_size: int = 128, learning_rate: float = 2e-3,
          seed: int = 0, data_dir: str | None = None) -> dict[str, float]:
    """Trains SmallClassifier, saves its params to out_path, returns test accuracy etc."""
    model = SmallClassifier()
    source = make_source("fashion_mnist_idx", split="train", data_dir=data_dir)
    batches = BatchIterator(source, batch_size, seed=seed, num_epochs=epochs)
    num_steps = batches.num_batches
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]
    opt_state = tx.init(params)
    step = _make_step(model, tx)
    start = time.time()
    for i, batch in enumerate(batches):
        params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
        if i % 100 == 0 or i == num_steps - 1:
            print(f"step {i + 1}/{num_steps}  loss {float(loss):.4f}  "
                  f"{time.time() - start:.0f}s", flush=True)
    train_time = time.time() - start
    test_acc = accuracy(model, params, data_dir=data_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_classifier(out_path, params)
    result = dict(test_accuracy=test_acc, train_seconds=train_time,
                  file_bytes=os.path.getsize(out_path))
    print(f"test accuracy {test_acc:.4f}; trained in {train_time:.0f}s; wrote "
          f"{out_path} ({result['file_bytes'] / 1e6:.2f} MB)")
    return result


def main(argv: Sequence[str]) -> None:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train(FLAGS.out, FLAGS.epochs, FLAGS.batch_size, FLAGS.learning_rate, FLAGS.seed,
          FLAGS.data_dir)


if __name__ == "__main__":
    cli.run(main, FLAGS)
