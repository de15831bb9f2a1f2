"""Steps/s of the default config's train step on all CPU cores (one XLA device per core,
batch sharded over them) vs one device, interleaved in one process.

    python -m experiments.cpu_devices.run [--config configs/default.py] [--reps 7] [--steps 10]

The process is started with one CPU device per core (diffusion.cpu_devices); the
one-device run uses jax.devices()[:1] of the same process, the all-core run every
device. Both train steps are compiled first; then `reps` rounds each time `steps`
steps of A and of B, alternating which goes first, so that load from other jobs on a
shared machine hits both alike. Prints a markdown table: median steps/s, spread
(min-max), cores used (process CPU time / wall time), the busiest thread's share of the
process's CPU time (1 / that share bounds the cores the step can use however idle the
machine), the mean number of runnable threads (sampled every 5 ms from /proc: the
cores the step would keep busy on an idle machine, a measure of parallelism that other
jobs on a shared machine do not change, where steps/s is not), n, and the ratio of the
medians and of per-round ratios.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from typing import Sequence

from absl import app, flags

from diffusion import cli, cpu_devices  # no JAX: cpu_devices must act before JAX starts

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("config", "configs/default.py", "config file", flag_values=FLAGS)
flags.DEFINE_string("devices", "auto", "auto (one per core) or N", flag_values=FLAGS)
flags.DEFINE_integer("reps", 7, "rounds", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "timed steps per round and setup", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "untimed steps after compile", flag_values=FLAGS)


def thread_ticks() -> dict[str, int]:
    """CPU ticks (user + system) of each thread of this process, from /proc (Linux)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = int(fields[11]) + int(fields[12])
        except OSError:  # the thread ended
            pass
    return out


class RunnableSampler:
    """Samples, every `period` s on a background thread, how many threads of this
    process are runnable (state R in /proc: running, or waiting for a core). Its mean is
    the parallelism the work offers, i.e. the cores it would use on an idle machine,
    whatever other jobs take of the cores now."""

    def __init__(self, period: float = 0.005):
        self.period, self.counts = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = str(threading.get_native_id())
        while not self._stop.wait(self.period):
            n = 0
            for tid in os.listdir("/proc/self/task"):
                if tid == me:
                    continue
                try:
                    with open(f"/proc/self/task/{tid}/stat") as f:
                        n += f.read().rsplit(")", 1)[1].split()[0] == "R"
                except OSError:
                    pass
            self.counts.append(n)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.counts) / max(1, len(self.counts))


def main(argv: Sequence[str]) -> None:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    args = FLAGS
    n = cpu_devices.configure(args.devices)
    import importlib.util

    import jax

    from diffusion import parallel
    from diffusion.data import BatchIterator
    from diffusion.train import loop
    from diffusion.train.setup import build_run

    spec = importlib.util.spec_from_file_location("cfg", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("")
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices "
          f"(cpu_devices -> {n}), cores {cpu_devices.available_cores()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

    setups = {}
    tmp = tempfile.mkdtemp()
    for name, devs in (("1 device", jax.devices()[:1]), (f"{jax.device_count()} devices",
                                                          jax.devices())):
        run = build_run(config, os.path.join(tmp, name.replace(" ", "_")), devs)
        state = jax.jit(run.init_fn, out_shardings=run.state_sharding)(jax.random.key(0))
        step = loop._train_step_fn(run)
        it = BatchIterator(run.source, config.data.global_batch_size, config.seed,
                           random_flip=config.data.random_flip)
        batches = [parallel.global_batch(it.batch_at(i), run.mesh) for i in range(args.steps)]
        t0 = time.perf_counter()
        step = step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        for i in range(args.warmup):
            state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        setups[name] = dict(step=step, state=state, batches=batches, compile_s=compile_s,
                            rates=[], cores=[], busiest=[], runnable=[])
        print(f"{name}: compiled in {compile_s:.1f} s", flush=True)

    names = list(setups)
    for r in range(args.reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            s = setups[name]
            state = s["state"]
            ticks0 = thread_ticks()
            t0, c0 = time.perf_counter(), time.process_time()
            with RunnableSampler() as sampler:
                for i in range(args.steps):
                    state, metrics = s["step"](state, s["batches"][i])
                jax.block_until_ready((state, metrics))
            wall = time.perf_counter() - t0
            s["runnable"].append(sampler.mean)
            s["rates"].append(args.steps / wall)
            s["cores"].append((time.process_time() - c0) / wall)
            ticks = thread_ticks()
            per_thread = [ticks[t] - ticks0.get(t, 0) for t in ticks]
            s["busiest"].append(max(per_thread) / max(1, sum(per_thread)))
            s["state"] = state
        print(f"round {r}: " + ", ".join(f"{k} {setups[k]['rates'][-1]:.2f}" for k in names),
              flush=True)

    a, b = (setups[k]["rates"] for k in names)
    med = {k: statistics.median(setups[k]["rates"]) for k in names}
    ratios = [y / x for x, y in zip(a, b)]
    print(f"\nconfig {args.config}, batch {config.data.global_batch_size}, "
          f"{args.reps} rounds x {args.steps} steps each, interleaved\n")
    print("| devices | compile s | steps/s median | min | max | cores used | busiest thread "
          "share | runnable threads | n |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in names:
        rates = setups[k]["rates"]
        print(f"| {k} | {setups[k]['compile_s']:.1f} | {med[k]:.2f} | {min(rates):.2f} | "
              f"{max(rates):.2f} | {statistics.median(setups[k]['cores']):.2f} | "
              f"{statistics.median(setups[k]['busiest']):.2f} | "
              f"{statistics.median(setups[k]['runnable']):.2f} | {len(rates)} |")
    print(f"\nratio of medians {med[names[1]] / med[names[0]]:.2f}; per-round ratio median "
          f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}, "
          f"n {len(ratios)})")


if __name__ == "__main__":
    cli.run(main, FLAGS)
