"""Training and sampling throughput of the DiT and U-Net denoisers, and their MFU, on
whatever devices JAX finds.

    python -m experiments.throughput.run --out experiments/throughput/results
    python -m experiments.throughput.run --rows DiT-XL/2 --batch 256 --steps 30 --remat on
    python -m experiments.throughput.run --rows DiT-S/8 --batch 2 --steps 2 --tiny  # CPU

(from the repository root, where `experiments` is a package)

Rows (see rows.py): DiT-S/2, B/2, L/2, XL/2 training at 32x32x4 latents, batch 256,
1000 classes, learned sigma; UNet-CIFAR (DDPM's 35.7M U-Net) at 32x32x3, batch 128;
Sample-DiT-XL/2: 50 DDIM steps with classifier-free guidance at batch 256. First the
device's dense matmul peak is measured (an n^3 product, --matmul_size), then each row:
compile time, ms/step (median after warm-up), images/s, peak device memory, forward
GFLOPs (XLA's count) and MFU = 3 x forward FLOPs x images/s / peak.

Each measurement runs in a fresh process (--noisolate: all in this one), so that a
row's peak memory is its own and an out-of-memory row does not end the others. With
--remat auto (default) a training row that runs out of memory is retried with remat.
Writes results.json and results.md to --out (device kind, versions, date, command).
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import shlex
import subprocess
import sys
import traceback
from types import SimpleNamespace
from typing import Sequence

from absl import app, flags

from diffusion import cli
from experiments.throughput import report
from experiments.throughput.rows import DEFAULT_ROWS, parse_rows

# The repository root: workers run as `python -m experiments.throughput.run` from there.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_RESULT = "THROUGHPUT_RESULT "


FLAGS = flags.FlagValues()  # the tool's own registry (see diffusion.cli)
flags.DEFINE_string("rows", "all", f"comma-separated; all = {','.join(DEFAULT_ROWS)}",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch", 0, "global batch of every row; 0 = each row's own (256, U-Net "
                     "128)", flag_values=FLAGS)
flags.DEFINE_integer("steps", 20, "timed train steps per row", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "untimed train steps after compile", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                  "activations (parameters and optimizer states stay float32)",
                  flag_values=FLAGS)
flags.DEFINE_enum("remat", "auto", ["off", "on", "auto"],
                  "rematerialise blocks; auto = only after running out of memory",
                  flag_values=FLAGS)
flags.DEFINE_bool("fsdp", False, "shard params/EMA/Adam over devices", flag_values=FLAGS)
flags.DEFINE_integer("devices", 0, "use the first N devices; 0 = all", flag_values=FLAGS)
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"], "attention backend",
                  flag_values=FLAGS)
flags.DEFINE_integer("sample_steps", None, "DDIM steps of Sample- rows (default 50; 2 with "
                     "--tiny)", flag_values=FLAGS)
flags.DEFINE_integer("sample_repeats", 3, "timed sampling calls", flag_values=FLAGS)
flags.DEFINE_integer("matmul_size", None, "n of the n^3 peak matmul (default 8192; 512 with "
                     "--tiny)", flag_values=FLAGS)
flags.DEFINE_float("peak_tflops", 0.0, "per-device peak for MFU; 0 = the measured matmul "
                   "peak", flag_values=FLAGS)
flags.DEFINE_bool("tiny", False, "tiny networks, for CPU smoke runs", flag_values=FLAGS)
flags.DEFINE_string("out", "experiments/throughput/results", "output directory",
                    flag_values=FLAGS)
flags.DEFINE_bool("isolate", True, "one process per measurement (default) or, with "
                  "--noisolate, all in this one", flag_values=FLAGS)
flags.DEFINE_string("worker", "", "internal: run one measurement (JSON) and print its result",
                    flag_values=FLAGS)


def parse_args(argv: Sequence[str]) -> SimpleNamespace:
    """The options of argv (program name first), defaults filled in and checked."""
    if len(cli.parse(FLAGS, argv)) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    args = SimpleNamespace(**FLAGS.flag_values_dict())
    if args.sample_steps is None:
        args.sample_steps = 2 if args.tiny else 50
    if args.matmul_size is None:
        args.matmul_size = 512 if args.tiny else 8192
    for name in ("steps", "sample_steps", "sample_repeats", "matmul_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.warmup, args.batch, args.devices) < 0:
        raise SystemExit("--warmup, --batch and --devices must be >= 0")
    return args


def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_task(task: dict) -> dict:
    """One measurement in this process: {'task': 'peak'} or {'task': 'row', 'name': ...}."""
    from experiments.throughput import bench
    opts = task["options"]
    if task["task"] == "peak":
        return {"device": bench.device_info(opts["devices"]),
                "peak": bench.matmul_peak(opts["matmul_size"], opts["dtype"])}
    row = parse_rows(task["name"], opts["tiny"])[0]
    batch = opts["batch"] or row.batch
    common = dict(batch=batch, dtype=opts["dtype"], fsdp=opts["fsdp"],
                  attention=opts["attention"], num_devices=opts["devices"])
    if row.kind == "sample":
        return bench.sample_row(row, num_steps=opts["sample_steps"],
                                repeats=opts["sample_repeats"], **common)
    remat = opts["remat"] == "on"
    try:
        return bench.train_row(row, steps=opts["steps"], warmup=opts["warmup"],
                               remat=remat, **common)
    except Exception as e:  # noqa: BLE001  (retry only what is an out-of-memory error)
        if opts["remat"] != "auto" or not _is_oom(e):
            raise
    print(f"{row.name}: out of memory without remat; retrying with remat", file=sys.stderr)
    gc.collect()  # free the failed attempt's arrays before the second one allocates
    result = bench.train_row(row, steps=opts["steps"], warmup=opts["warmup"], remat=True,
                             **common)
    return dict(result, retried_after_oom=True)


def _safe_task(task: dict) -> dict:
    try:
        return run_task(task)
    except Exception as e:  # noqa: BLE001  (a failed row is reported, the others go on)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _in_subprocess(task: dict) -> dict:
    env = dict(os.environ)
    # A worker is alone on the device: let XLA's allocator take most of it.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    cmd = [sys.executable, "-m", "experiments.throughput.run", "--worker", json.dumps(task)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env,
                          cwd=_ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    return {"error": f"worker exited with status {proc.returncode} and no result"}


def _versions() -> dict:
    import flax
    import jax
    import jaxlib
    import optax
    return {"python": sys.version.split()[0], "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__}


def main(argv: Sequence[str]) -> dict:
    """Runs the benchmark; argv as absl.app gives it (program name first)."""
    args = parse_args(argv)
    if args.worker:
        print(_RESULT + json.dumps(_safe_task(json.loads(args.worker))), flush=True)
        return {}
    rows = parse_rows(args.rows, args.tiny)  # bad names fail before anything runs
    options = {k: getattr(args, k) for k in ("batch", "steps", "warmup", "dtype", "remat",
                                             "fsdp", "devices", "attention", "sample_steps",
                                             "sample_repeats", "matmul_size", "tiny")}
    measure = _in_subprocess if args.isolate else _safe_task
    first = measure({"task": "peak", "options": options})
    if "error" in first:
        raise SystemExit(f"could not measure the device's matmul peak: {first['error']}")
    device, peak = first["device"], first["peak"]
    print(f"{device['device_kind']} x {device['num_devices']}: matmul peak "
          f"{peak['peak_tflops']:.1f} TFLOP/s", flush=True)
    results = []
    for row in rows:
        r = dict(name=row.name, **measure({"task": "row", "name": row.name,
                                           "options": options}))
        results.append(r)
        print(f"{row.name}: " + (r["error"] if "error" in r else
                                 f"{r['ms_per_step']:.2f} ms/step, "
                                 f"{r['images_per_s']:,.1f} img/s, compile "
                                 f"{r['compile_s']:.1f} s"), flush=True)
    nominal = report.nominal_peak(device["device_kind"])
    mfu_peak = args.peak_tflops or peak["peak_tflops"]
    report.add_mfu(results, mfu_peak, nominal, device["num_devices"])
    for r in results:
        r["meets_target"] = report.meets_target(r, default_batch=not args.batch and not args.tiny)
    result = {
        "device": device, "peak": peak, "mfu_peak_tflops": mfu_peak, "nominal_tflops": nominal,
        "versions": _versions(), "options": options, "rows": results,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "experiments.throughput.run", *argv[1:]]),
    }
    json_path, md_path = report.write(result, args.out)
    print(report.markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    cli.run(main, FLAGS)
