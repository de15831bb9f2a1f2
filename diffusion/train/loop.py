"""The training loop: `train_and_evaluate(config, workdir)`.

The host loop dispatches step k before it reads the metrics of step k-1, and reads
device values only on logging steps. It resumes from the newest good checkpoint in
`workdir`, saves every `train.checkpoint_every` steps and on SIGTERM, draws sample
grids from the EMA and the raw parameters, and stops with a clear message on a
non-finite loss.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from diffusion import images, parallel
from diffusion.data import BatchIterator
from diffusion.train import latent_decoding, sampling
from diffusion.train.setup import Run, build_run, write_config
from diffusion.writers import MetricWriter, Progress

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


def _cost_flops(compiled) -> float:
    """FLOPs of one compiled call from XLA's cost model (0 when unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have no cost model
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _train_step_fn(run: Run):
    step = run.objective.make_step(run)
    if run.config.train.fsdp:
        inner = step

        def step(state, batch):
            # All-gather each FSDP-sharded weight for the step, rather than letting XLA
            # re-shard the batch-sharded activations to match the weights' split.
            return inner(state.replace(params=parallel.gathered(state.params, run.mesh)), batch)
    repl, data = parallel.replicated(run.mesh), parallel.data_sharded(run.mesh)
    return jax.jit(step, in_shardings=(run.state_sharding, data),
                   out_shardings=(run.state_sharding, repl), donate_argnums=0)


def sample_fn_for(run: Run, sampler: str, num_steps: int, batch_size: int):
    """fn(params, key, offset, guidance) -> images; a latent run's latents are decoded
    by its VAE (loaded here, once) right after each sampling call."""
    fn = sampling.make_sample_fn(
        lambda params: run.objective.denoiser(run, params), image_shape=run.image_shape,
        num_classes=run.num_classes, sampler=sampler, num_steps=num_steps,
        batch_size=batch_size, mesh=run.mesh,
        options=sampling.sampler_options(run.config.sample, sampler))
    return latent_decoding.decoding_sample_fn(run, fn)


def restore_or_init(run: Run):
    """(state, data_step) from the newest good checkpoint, or freshly initialised."""
    if run.checkpointer.latest_step() is not None:
        state, extra = run.checkpointer.restore(run.abstract_state)
        data_step = int(extra.get("data_step", int(state.step)))
        log.info("resumed from checkpoint at step %d", int(state.step))
        return state, data_step
    init = jax.jit(run.init_fn, out_shardings=run.state_sharding)
    return run.objective.prepare(run, init(jax.random.key(run.config.seed))), 0


class _Sigterm:
    """Turns SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave SIGTERM alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _save(run: Run, state, step: int, data_step: int) -> None:
    # data_step counts the batches the saved state has trained on; the iterator itself
    # has already been advanced past the next batch, which is not consumed yet.
    run.checkpointer.save(step, state, {"data_step": data_step,
                                        "config": run.config.to_json_best_effort()})


def _write_samples(run: Run, writer: MetricWriter, sample_fn, sample_bs: int, state,
                   step: int) -> None:
    """Sample grids from the EMA and raw params, or the objective's own images."""
    c = run.config
    visualize = getattr(run.objective, "visualize", None)
    if visualize is not None:
        pictures = visualize(run, state)
    else:
        key = jax.random.key(c.sample.seed)
        pictures = {tag: sampling.generate(sample_fn, params, key, c.sample.num_samples,
                                           sample_bs, c.sample.guidance_scale)
                    for tag, params in (("samples_ema", state.ema_params),
                                        ("samples_raw", state.params))}
    k = run.num_classes if visualize is None else 0  # sample i has label i % k
    for tag, x in pictures.items():
        nrow = None
        if k and np.ndim(x) == 4 and len(x) % k == 0:  # one row per class
            x, nrow = x[np.argsort(np.arange(len(x)) % k, kind="stable")], len(x) // k
        grid = images.make_grid(x, nrow) if np.ndim(x) == 4 else x
        writer.write_images(step, {tag: grid})
        if jax.process_index() == 0:
            os.makedirs(os.path.join(run.workdir, "samples"), exist_ok=True)
            images.save_png(os.path.join(run.workdir, "samples", f"{tag}_{step:07d}.png"), grid)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict:
    """Trains per `config` in `workdir` (resuming if it holds a checkpoint) on `devices`
    (default: all). Returns the last logged metrics."""
    run = build_run(config, workdir, devices)
    c = config
    write_config(c, run.workdir)
    writer = MetricWriter(run.workdir, enabled=jax.process_index() == 0)
    state, data_step = restore_or_init(run)
    start = int(state.step)
    if start == 0 and jax.process_index() == 0:
        from clu import parameter_overview
        print(parameter_overview.get_parameter_overview(jax.device_get(state.params)),
              flush=True)
    writer.write_hparams(c.to_dict())

    batches = BatchIterator(run.source, c.data.global_batch_size, c.seed,
                            random_flip=c.data.random_flip, image_size=run.image_shape[:2],
                            process_index=jax.process_index(),
                            process_count=jax.process_count(), start_step=data_step,
                            prefetch=2)
    train_step = _train_step_fn(run)
    sample_bs = min(c.sample.batch_size, c.sample.num_samples)
    sample_bs = int(math.ceil(sample_bs / run.mesh.devices.size) * run.mesh.devices.size)
    sample_fn = sample_fn_for(run, c.sample.sampler, c.sample.num_steps, sample_bs)

    evaluate = None
    if c.train.eval_every:
        from diffusion.train.evaluator import make_evaluator
        evaluate = make_evaluator(run, sample_fn_for)

    batch = parallel.global_batch(next(batches), run.mesh)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops_per_step = _cost_flops(compiled)
    log.info("train step compiled in %.1f s", compile_s)

    progress = Progress(c.train.num_steps) if jax.process_index() == 0 else None
    pending, last_metrics = None, {}
    t_log, step_log = time.perf_counter(), start
    with _Sigterm() as sigterm:
        step = start
        while step < c.train.num_steps:
            state, metrics = compiled(state, batch)
            step += 1
            if pending is not None:  # read step k-1 only now that step k is queued
                last_metrics = _log(pending, writer, progress, c, flops_per_step,
                                    compile_s, t_log, step_log)
                t_log, step_log = time.perf_counter(), pending[0]
                pending, compile_s = None, None  # compile time: with the first log only
            if step % c.train.log_every == 0 or step == c.train.num_steps:
                pending = (step, metrics)
            if step < c.train.num_steps:
                batch = parallel.global_batch(next(batches), run.mesh)
            if c.train.sample_every and step % c.train.sample_every == 0:
                _write_samples(run, writer, sample_fn, sample_bs, state, step)
            if evaluate is not None and (step % c.train.eval_every == 0
                                         or step == c.train.num_steps):
                scores = evaluate(state.ema_params)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
                log.info("step %d eval (EMA, %s %d steps): %s", step, c.eval.sampler,
                         c.eval.num_steps, scores)
            if step % c.train.checkpoint_every == 0 or step == c.train.num_steps:
                _save(run, state, step, data_step + step - start)
            if sigterm.received:
                log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
                _save(run, state, step, data_step + step - start)
                break
    if pending is not None:
        last_metrics = _log(pending, writer, progress, c, flops_per_step, compile_s, t_log,
                            step_log)
    if c.train.sample_every and step == c.train.num_steps and step % c.train.sample_every:
        _write_samples(run, writer, sample_fn, sample_bs, state, step)
    run.checkpointer.wait()
    run.checkpointer.close()
    batches.close()
    writer.flush()
    writer.close()
    return last_metrics


def _log(pending, writer, progress, c, flops_per_step, compile_s, t_log, step_log) -> dict:
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss"]):
        raise NonFiniteLossError(
            f"loss is {values['loss']} at step {step}; stopping. The last good checkpoint "
            f"is the newest one in the workdir; lower optim.lr or enable optim.grad_clip.")
    elapsed = time.perf_counter() - t_log
    if step > step_log and elapsed > 0:
        values["steps_per_s"] = (step - step_log) / elapsed
        values["images_per_s"] = values["steps_per_s"] * c.data.global_batch_size
        if flops_per_step:
            values["tflops_per_s"] = values["steps_per_s"] * flops_per_step / 1e12
            # XLA's cost is of the per-device program, so this is one device's MFU.
            if c.train.get("peak_tflops", 0.0) > 0:
                values["mfu"] = values["tflops_per_s"] / c.train.peak_tflops
    if compile_s is not None:
        values["compile_time_s"] = compile_s
    writer.write_scalars(step, values)
    if progress is not None:
        progress.update(step, values)
    return dict(values, step=step)
