"""Compile time of a DiT train step, blocks unrolled vs under nn.scan (model.dit.scan_blocks).

    python -m experiments.throughput.compile_time [--variant XL/2] [--batch 2] [--reps 2]

The full train step of the throughput benchmark (diffusion.objectives.diffusion: learned-sigma
loss, AdamW, EMA) for the paper's DiT on 32x32x4 latents, 1000 classes, is lowered and
compiled from abstract inputs (jax.ShapeDtypeStruct: nothing is materialised, so
DiT-XL/2 needs no 10 GB of state) with jax.jit(...).lower(...).compile(). Compile time
barely depends on the batch. Each measurement runs in a fresh subprocess (no in-memory
compilation cache, no persistent cache), in the order A B B A A B ..., so that load
from other jobs hits both layouts alike. Prints a markdown table of lower and compile
seconds (median, min, max, n) and the CPU seconds of the compile (process time, all
threads): on a shared machine the wall time grows with the load, the CPU time does not.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Sequence

from absl import app, flags

from diffusion import cli

# The repository root: each measurement runs `python -m experiments.throughput.compile_time`
# from there.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("variant", "XL/2", "DiT variant", flag_values=FLAGS)
flags.DEFINE_integer("batch", 2, "global batch", flag_values=FLAGS)
flags.DEFINE_integer("reps", 2, "measurements per layout", flag_values=FLAGS)
flags.DEFINE_bool("remat", False, "rematerialise blocks", flag_values=FLAGS)
flags.DEFINE_enum("one", None, ["scan", "unrolled"], "internal: measure this layout once "
                  "in this process and print it as JSON", flag_values=FLAGS)


def measure(variant: str, batch: int, scan: bool, remat: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from configs.base import get_base_config
    from diffusion.models import DiT
    from diffusion.schedules import make_schedule
    from diffusion.objectives.diffusion import make_train_step
    from diffusion.train_state import init_state, make_optimizer

    model = DiT.from_variant(variant, input_size=32, in_channels=4, num_classes=1000,
                             learn_sigma=True, scan_blocks=scan, remat=remat)
    optim = get_base_config().optim  # DiT's: AdamW 1e-4, no clipping (as bench.py)
    optim.update(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0, grad_clip=0.0)
    tx, lr_fn = make_optimizer(optim, 1_000_000)
    step = make_train_step(
        model, make_schedule("linear", 1000), tx, lr_fn, pred_type="eps",
        weighting="simple", min_snr_gamma=5.0, time_sampling="uniform", discrete_time=True,
        learned_sigma=True, vlb_weight=0.001, num_classes=1000, label_dropout=0.1,
        ema_rate=0.9999, ema_warmup=False)
    state = jax.eval_shape(lambda k: init_state(model, tx, k, image_shape=(32, 32, 4),
                                                num_classes=1000), jax.random.key(0))
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, 32, 32, 4), jnp.float32),
                  "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = jax.jit(step, donate_argnums=0).lower(state, batch_spec)
    t1, c1 = time.perf_counter(), time.process_time()
    lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return {"scan": scan, "remat": remat, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "lower_cpu_s": c1 - c0, "compile_cpu_s": c2 - c1, "jax": jax.__version__}


def main(argv: Sequence[str]) -> None:
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    args = FLAGS
    if args.one:
        print(json.dumps(measure(args.variant, args.batch, args.one == "scan", args.remat)))
        return
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    results = {"unrolled": [], "scan": []}
    order = []
    for r in range(args.reps):
        order += ["unrolled", "scan"] if r % 2 == 0 else ["scan", "unrolled"]
    for layout in order:
        cmd = [sys.executable, "-m", "experiments.throughput.compile_time", "--variant",
               args.variant, "--batch", str(args.batch), "--one", layout] + (
                   ["--remat"] if args.remat else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results[layout].append(res)
        print(f"{layout}: lower {res['lower_s']:.1f} s, compile {res['compile_s']:.1f} s "
              f"(CPU {res['compile_cpu_s']:.1f} s)", flush=True)
    print(f"\nDiT-{args.variant} train step, batch {args.batch}, remat {args.remat}, "
          f"jax {res['jax']}, fresh process per measurement\n")
    print("| blocks | lower s (wall) | compile s (wall) median | min | max | lower CPU-s | "
          "compile CPU-s median | min | max | n |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layout, rs in results.items():
        c = [r["compile_s"] for r in rs]
        cpu = [r["compile_cpu_s"] for r in rs]
        lo = statistics.median(r["lower_s"] for r in rs)
        lo_cpu = statistics.median(r["lower_cpu_s"] for r in rs)
        print(f"| {layout} | {lo:.1f} | {statistics.median(c):.1f} | {min(c):.1f} | "
              f"{max(c):.1f} | {lo_cpu:.1f} | {statistics.median(cpu):.1f} | {min(cpu):.1f} | "
              f"{max(cpu):.1f} | {len(c)} |")


if __name__ == "__main__":
    cli.run(main, FLAGS)
