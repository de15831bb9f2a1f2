"""The training loop: `train_and_evaluate(config, workdir)`.

The host loop dispatches step k before it reads the metrics of step k-1, and reads
device values only on logging steps. It resumes from the newest good checkpoint in
`workdir`, saves every `train.checkpoint_every` steps and on SIGTERM, draws sample
grids from the EMA and the raw parameters, and stops with a clear message on a
non-finite loss.

Nothing is lost: every step also computes, on the device, whether the loss and the
state stayed finite; that flag is read with the logs and before every save, so a
non-finite state is never saved and the good checkpoints are never rotated out by
bad ones. A failed write (full disk) stops the run within a step; one run holds the
workdir at a time (`workdir_lock`); teardown always waits for the checkpointer and
closes the writers, whatever stopped the run.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion import images, parallel, sampling
from diffusion.autoencoder.sample_decoding import decoding_sample_fn
from diffusion.config_file import write_config
from diffusion.data import BatchIterator
from diffusion.io_errors import guard
from diffusion.models.text_conditional import TextConditional
from diffusion.train import profiling, text_encoder
from diffusion.train.evaluator import make_evaluator
from diffusion.train.setup import Run, build_run
from diffusion.train.workdir_lock import WorkdirLock
from diffusion.writers import MetricWriter, Progress

log = logging.getLogger(__name__)


# Exit statuses of `launch.py` (documented in README, "Exit status"): 0 finished,
# 1 unexpected error, 2 bad config, 3 non-finite values, 4 a write failed (disk full,
# I/O error), 5 workdir in use, and EXIT_PREEMPTED when SIGTERM stopped the run after
# saving a checkpoint: relaunching the same command resumes it.
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "temporary failure, try again"


class NonFiniteLossError(FloatingPointError):
    exit_code = 3


class Preempted(RuntimeError):
    """SIGTERM: a checkpoint of the current step was saved, then the run stopped."""
    exit_code = EXIT_PREEMPTED


def _cost_flops(compiled) -> float:
    """FLOPs of one compiled call from XLA's cost model (0 when unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have no cost model
        return 0.0
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _step_fn(run: Run):
    step = run.objective.make_step(run)
    if run.config.train.fsdp:
        inner = step

        def step(state, batch):
            # All-gather each FSDP-sharded weight for the step, rather than letting XLA
            # re-shard the batch-sharded activations to match the weights' split.
            return inner(state.replace(params=parallel.gathered(state.params, run.mesh)), batch)
    return step


def _train_step_fn(run: Run):
    """The jitted train step (state, batch) -> (state, metrics)."""
    repl, data = parallel.replicated(run.mesh), parallel.data_sharded(run.mesh)
    return jax.jit(_step_fn(run), in_shardings=(run.state_sharding, data),
                   out_shardings=(run.state_sharding, repl), donate_argnums=0)


# Leaves up to this many elements are checked together, as one concatenation (a copy of
# at most their total size); larger leaves get one reduction each.
_FINITE_CHECK_JOIN_MAX = 1 << 16


def _replicated_leaf(run: Run):
    """shape -> whether the run's state keeps a leaf of that shape whole on each device
    (always, unless FSDP shards it): only those are joined by _all_finite, since joining
    a sharded leaf would gather it."""
    if not run.config.train.fsdp:
        return lambda shape: True
    n = run.mesh.devices.size
    return lambda shape: parallel.fsdp_spec(shape, n) == parallel.P()


def _all_finite(tree, replicated=lambda shape: True) -> jax.Array:
    """Whether every float in `tree` is finite (integer and key leaves are skipped).

    One reduction per leaf costs XLA a kernel each, and the train step checks the whole
    state (params, both Adam moments, EMA): 512 reductions for the tiny test U-Net, half
    of its train step's CPU compile time (measured 12.4 s -> 7.0 s). So the small
    replicated leaves are joined into one vector first."""
    leaves = [x for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    joined = [jnp.size(x) <= _FINITE_CHECK_JOIN_MAX and replicated(jnp.shape(x))
              for x in leaves]
    checks = [jnp.isfinite(x).all() for x, j in zip(leaves, joined) if not j]
    small = [jnp.ravel(x).astype(jnp.float32) for x, j in zip(leaves, joined) if j]
    if small:
        checks.append(jnp.isfinite(jnp.concatenate(small)).all())
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _checked_train_step_fn(run: Run):
    """(state, batch, first_bad) -> (state, metrics, first_bad): first_bad is 0 while
    the loss and every float of the state have stayed finite, else the first step
    that was not. Computed on the device every step (_all_finite: one reduction over the
    joined small leaves, one per large or FSDP-sharded leaf), read only with the logs and
    before each save, so it costs no host sync."""
    step = _step_fn(run)
    replicated = _replicated_leaf(run)

    def checked(state, batch, first_bad):
        new_state, metrics = step(state, batch)
        finite = _all_finite((metrics.get("loss", 0.0), new_state), replicated)
        first_bad = jnp.where((first_bad == 0) & ~finite,
                              state.step.astype(jnp.int32) + 1, first_bad)
        return new_state, metrics, first_bad
    repl, data = parallel.replicated(run.mesh), parallel.data_sharded(run.mesh)
    return jax.jit(checked, in_shardings=(run.state_sharding, data, repl),
                   out_shardings=(run.state_sharding, repl, repl), donate_argnums=0)


def sample_fn_for(run: Run, sampler: str, num_steps: int, batch_size: int):
    """fn(params, key, offset, guidance) -> images; a latent run's latents are decoded
    by its VAE (loaded here, once) right after each sampling call."""
    fn = sampling.make_sample_fn(
        lambda params: run.objective.denoiser(run, params), image_shape=run.image_shape,
        num_classes=run.num_classes, sampler=sampler, num_steps=num_steps,
        batch_size=batch_size, mesh=run.mesh,
        options=sampling.sampler_options(run.config.sample, sampler),
        **sampling.prompt_inputs(run.model, run.config))  # a text run: sample.prompt
    return decoding_sample_fn(run, fn)


def _verify_finite(state, replicated=lambda shape: True) -> None:
    if not bool(jax.jit(lambda tree: _all_finite(tree, replicated))(state)):
        raise FloatingPointError("it holds non-finite values")


def restore_or_init(run: Run):
    """(state, data_step) from the newest good checkpoint, or freshly initialised.

    A newest checkpoint that cannot be read or holds non-finite values (written by an
    older version of this loop) is moved aside and the previous one is used."""
    if run.checkpointer.latest_step() is not None:
        step, state, extra = run.checkpointer.restore_latest(
            run.abstract_state, move_aside=True,
            verify=lambda state: _verify_finite(state, _replicated_leaf(run)))
        data_step = int(extra.get("data_step", int(state.step)))
        log.info("resumed from checkpoint at step %d", int(state.step))
        return state, data_step
    init = jax.jit(run.init_fn, out_shardings=run.state_sharding)
    state = run.objective.prepare(run, init(jax.random.key(run.config.seed)))
    return text_encoder.load_pretrained(run, state), 0


class _Sigterm:
    """Turns SIGTERM into a flag the loop checks, so it can save before exiting. A
    second SIGTERM is not deferred: it ends the process at once (default action)."""

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
        if self.received:  # asked twice: whatever the loop is waiting on, stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.received = True

    def stop_requested(self, at_sync_point: bool) -> bool:
        """Whether to stop now. Multi-host: every process must stop at the same step,
        so the flags are combined only at sync points (log and checkpoint steps)."""
        if jax.process_count() == 1:
            return self.received
        if not at_sync_point:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self.received, np.int32))
        return bool(np.any(flags))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _nonfinite_message(run: Run, first_bad: int, loss: float | None = None) -> str:
    c = run.config
    step = run.checkpointer.latest_step()
    good = (f"the last good checkpoint is step {step} ({run.checkpointer.directory}/{step}), "
            f"kept and resumed from on relaunch" if step is not None
            else "no checkpoint was saved before it")
    what = f"loss {loss}" if loss is not None and not math.isfinite(loss) else "values"
    tips = [f"a lower optim.lr (now {c.optim.lr:g})"]
    tips.append(f"a smaller optim.grad_clip (now {c.optim.grad_clip:g})" if c.optim.grad_clip
                else "optim.grad_clip=1")
    tips.append(f"a longer optim.warmup_steps (now {c.optim.warmup_steps})")
    if c.model.dtype != "float32":
        tips.append(f"model.dtype=float32 (now {c.model.dtype})")
    return (f"non-finite {what} in the state after step {first_bad}; stopped without "
            f"saving it: {good}. Try " + ", ".join(tips))


def _save(run: Run, state, step: int, data_step: int, first_bad) -> None:
    """Saves unless the state went non-finite: then stops, so no checkpoint (and no
    rotation of the good ones out) ever comes from a diverged run."""
    bad = int(jax.device_get(first_bad))
    if bad:
        run.checkpointer.wait()  # the good saves in flight finish first
        raise NonFiniteLossError(_nonfinite_message(run, bad))
    # data_step counts the batches the saved state has trained on; the iterator itself
    # has already been advanced past the next batch, which is not consumed yet.
    run.checkpointer.save(step, state, {"data_step": data_step,
                                        "config": run.config.to_json_best_effort()})


def _write_samples(run: Run, writer: MetricWriter, sample_fn, sample_bs: int, state,
                   step: int) -> None:
    """Sample grids from the EMA and raw params, or the objective's own images (a
    text run: sample.num_samples per prompt, sample i of prompt i % P)."""
    c = run.config
    visualize = getattr(run.objective, "visualize", None)
    num_prompts = 0
    if visualize is None and isinstance(run.model, TextConditional):
        num_prompts = len(sampling.config_prompts(c.sample)[0])
    if visualize is not None:
        pictures = visualize(run, state)
    else:
        key = jax.random.key(c.sample.seed)
        num = c.sample.num_samples * max(num_prompts, 1)
        pictures = {tag: sampling.generate(sample_fn, params, key, num, sample_bs,
                                           c.sample.guidance_scale)
                    for tag, params in (("samples_ema", state.ema_params),
                                        ("samples_raw", state.params))}
    k = (run.num_classes or num_prompts) if visualize is None else 0  # label/prompt i % k
    for tag, x in pictures.items():
        nrow = None
        if k and np.ndim(x) == 4 and len(x) % k == 0:  # one row per class / prompt
            x, nrow = x[np.argsort(np.arange(len(x)) % k, kind="stable")], len(x) // k
        grid = images.make_grid(x, nrow) if np.ndim(x) == 4 else x
        writer.write_images(step, {tag: grid})
        if jax.process_index() == 0:
            path = os.path.join(run.workdir, "samples", f"{tag}_{step:07d}.png")
            with guard(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                images.save_png(path, grid)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict:
    """Trains per `config` in `workdir` (resuming if it holds a checkpoint) on `devices`
    (default: all). Returns the last logged metrics.

    Raises NonFiniteLossError, WriteFailed, WorkdirLocked or Preempted (after saving)
    with one-line messages; each carries the `exit_code` launch.py exits with."""
    run = build_run(config, workdir, devices)
    lock = WorkdirLock(run.workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()  # before anything is written: a second launch is refused here
    closers: list = [run.checkpointer.close] + ([lock.release] if lock else [])
    try:
        with guard(os.path.join(run.workdir, "config.json")):
            write_config(config, run.workdir)
        state, data_step = restore_or_init(run)
        run = text_encoder.with_cached_captions(run, state)
        writer = MetricWriter(run.workdir, enabled=jax.process_index() == 0,
                              resume_step=int(state.step))
        closers.insert(0, writer.close)
        batches = BatchIterator(run.source, config.data.global_batch_size, config.seed,
                                random_flip=config.data.random_flip,
                                image_size=run.image_shape[:2],
                                process_index=jax.process_index(),
                                process_count=jax.process_count(), start_step=data_step,
                                prefetch=2)
        closers.insert(0, batches.close)
        metrics = _train(run, config, state, data_step, writer, batches)
    except BaseException:
        _close_all(closers, raise_first=False)
        raise
    _close_all(closers, raise_first=True)
    return metrics


def _close_all(closers, raise_first: bool) -> None:
    """Runs every closer (checkpointer waits for its saves, writers flush); the first
    failure is raised afterwards unless another error is already on its way out."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as e:  # noqa: BLE001 - every closer must run
            if first is None:
                first = e
            elif raise_first:
                log.warning("while closing: %s", e)
    if first is not None:
        if raise_first:
            raise first
        log.warning("while closing after the error below: %s", str(first).splitlines()[0])


def _train(run: Run, c: ml_collections.ConfigDict, state, data_step: int,
           writer: MetricWriter, batches: BatchIterator) -> dict:
    start = int(state.step)
    if start == 0 and jax.process_index() == 0:
        from clu import parameter_overview
        print(parameter_overview.get_parameter_overview(jax.device_get(state.params)),
              flush=True)
    writer.write_hparams(c.to_dict())

    train_step = _checked_train_step_fn(run)
    sample_bs = min(c.sample.batch_size, c.sample.num_samples)
    sample_bs = int(math.ceil(sample_bs / run.mesh.devices.size) * run.mesh.devices.size)
    sample_fn = sample_fn_for(run, c.sample.sampler, c.sample.num_steps, sample_bs)

    evaluate = None
    if c.train.eval_every:
        evaluate = make_evaluator(run, sample_fn_for)

    batch = parallel.global_batch(next(batches), run.mesh)
    first_bad = jax.device_put(jnp.zeros((), jnp.int32), parallel.replicated(run.mesh))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch, first_bad).compile()
    compile_s = time.perf_counter() - t0
    flops_per_step = _cost_flops(compiled)
    log.info("train step compiled in %.1f s", compile_s)

    progress = Progress(c.train.num_steps) if jax.process_index() == 0 else None
    pending, last_metrics = None, {}
    t_log, step_log = time.perf_counter(), start
    with _Sigterm() as sigterm, profiling.StepProfiler(c.train.get("profile_steps", ""),
                                                       run.workdir) as profiler:
        step = start
        while step < c.train.num_steps:
            profiler.before_step(step, state)
            state, metrics, first_bad = compiled(state, batch, first_bad)
            step += 1
            if pending is not None:  # read step k-1 only now that step k is queued
                last_metrics = _log(run, pending, writer, progress, c, flops_per_step,
                                    compile_s, t_log, step_log)
                t_log, step_log = time.perf_counter(), pending[0]
                pending, compile_s = None, None  # compile time: with the first log only
            is_log = step % c.train.log_every == 0 or step == c.train.num_steps
            is_ckpt = step % c.train.checkpoint_every == 0 or step == c.train.num_steps
            if is_log:
                pending = (step, metrics, first_bad)
            if step < c.train.num_steps:
                batch = parallel.global_batch(next(batches), run.mesh)
            run.checkpointer.check()  # a failed background save stops the run now
            if c.train.sample_every and step % c.train.sample_every == 0:
                _write_samples(run, writer, sample_fn, sample_bs, state, step)
            if evaluate is not None and (step % c.train.eval_every == 0
                                         or step == c.train.num_steps):
                scores = evaluate(state.ema_params)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
                log.info("step %d eval (EMA, %s %d steps): %s", step, c.eval.sampler,
                         c.eval.num_steps, scores)
            if is_ckpt:
                _save(run, state, step, data_step + step - start, first_bad)
            if sigterm.stop_requested(at_sync_point=is_log or is_ckpt):
                if pending is not None:
                    _log(run, pending, writer, progress, c, flops_per_step, compile_s,
                         t_log, step_log)
                log.warning("SIGTERM: saving a checkpoint at step %d and exiting", step)
                _save(run, state, step, data_step + step - start, first_bad)
                run.checkpointer.wait()
                raise Preempted(
                    f"preempted (SIGTERM) at step {step}: checkpoint saved in "
                    f"{run.checkpointer.directory}/{step}; relaunch the same command to "
                    f"resume")
        profiler.finish(state)
    if pending is not None:
        last_metrics = _log(run, pending, writer, progress, c, flops_per_step, compile_s,
                            t_log, step_log)
    if c.train.sample_every and step == c.train.num_steps and step % c.train.sample_every:
        _write_samples(run, writer, sample_fn, sample_bs, state, step)
    run.checkpointer.wait()
    writer.flush()
    return last_metrics


def _log(run, pending, writer, progress, c, flops_per_step, compile_s, t_log,
         step_log) -> dict:
    step, metrics, first_bad = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = int(jax.device_get(first_bad))
    if bad or not np.isfinite(values.get("loss", 0.0)):
        run.checkpointer.wait()  # the good saves in flight finish first
        raise NonFiniteLossError(_nonfinite_message(run, bad or step, values.get("loss")))
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
