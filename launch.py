"""Launches a run: python launch.py --config configs/NAME.py[:ARGS] --workdir DIR
[--config.a.b=VALUE ...] [--mode train|sample] [--sweep].

Configs are locked: overriding a key the config does not define, or giving a value of
the wrong type, is an error that names the key. `--sweep` runs every override set that
the config file's `sweep()` returns, each in its own sub-directory of the workdir named by
its dotted overrides (`WORKDIR/diffusion.schedule=cosine`); `--sweep_index=I` runs arm I
only and `--sweep_print` prints one such command per arm (for a job array).
Multi-host: pass --coordinator_address/--num_processes/--process_id, or --distributed
to let jax.distributed.initialize() find them (SLURM, TPU pods).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from diffusion import cpu_devices  # imports no JAX: must act before JAX starts
from diffusion.sweep import select_arms, sweep_commands, sweep_runs  # no JAX either

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "What to do.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every override set of the config's sweep().")
_SWEEP_INDEX = flags.DEFINE_integer("sweep_index", -1, "With --sweep: run only this arm "
                                    "(0-based; -1 = all), e.g. a job array's task index.")
_SWEEP_PRINT = flags.DEFINE_bool("sweep_print", False, "With --sweep: print one command per "
                                 "arm (this one plus --sweep_index=I) and exit.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with auto-detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_string(
    "cpu_devices", "auto", "CPU-only machines: split the host into this many XLA CPU devices, "
    "the batch sharded over them: auto (one per core, reduced to divide the batch), off, or N. "
    "No effect when XLA_FLAGS sets a device count, JAX_PLATFORMS names a non-CPU backend, "
    "or a GPU/TPU is present.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    import jax
    if _COORDINATOR.value or _DISTRIBUTED.value:
        # Gloo gives CPU-only jobs (tests, debugging) cross-process collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sweeping = _SWEEP.value or _SWEEP_PRINT.value or _SWEEP_INDEX.value >= 0
    config_path = config_flags.get_config_filename(flags.FLAGS["config"])
    runs = sweep_runs(config_path, _CONFIG.value) if sweeping else [("", _CONFIG.value)]
    if _SWEEP_PRINT.value:
        print("\n".join(sweep_commands(sys.argv, runs)), flush=True)
        return
    runs = select_arms(runs, _SWEEP_INDEX.value)
    # Our progress at INFO; libraries (orbax logs every save step) at WARNING.
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("diffusion").setLevel(logging.INFO)
    # Before JAX starts: XLA's CPU backend runs one program on about one core.
    cpu_devices.configure(_CPU_DEVICES.value, [_CONFIG.value.data.get("global_batch_size", 0)])
    _initialize_distributed()

    workdir = _WORKDIR.value
    for name, cfg in runs:
        run_dir = os.path.join(workdir, name) if name else workdir
        if cfg.get("pretrained", {}).get("path"):
            # A pretrained pipeline (configs/sd_text_to_image.py) is sampled, not trained.
            if _MODE.value != "sample":
                raise app.UsageError("pretrained.path is set: run it with --mode sample "
                                     "(training from pretrained weights is not implemented)")
            from diffusion.stable_diffusion.run import sample_pretrained
            print(f"wrote {sample_pretrained(cfg, run_dir)}", flush=True)
            continue
        from diffusion.train import sample_from_workdir, train_and_evaluate
        if _MODE.value == "train":
            metrics = train_and_evaluate(cfg, run_dir)
            print(f"finished {run_dir}: {metrics}", flush=True)
        else:
            # The run's config.json is its truth: only the keys set on the command line
            # are checked against it, the rest of a model's keys come from it.
            overrides = list(config_flags.get_override_values(flags.FLAGS["config"]))
            print(f"wrote {sample_from_workdir(cfg, run_dir, overrides)}", flush=True)


def main_with_exit_status(argv):
    """main, but an error that explains itself (it carries an `exit_code`: bad config,
    non-finite loss, full disk, workdir in use, SIGTERM after saving) is printed as its
    one line and exits with that status; see README, "Exit status"."""
    try:
        main(argv)
    except Exception as e:  # noqa: BLE001 - anything without exit_code is re-raised
        code = getattr(e, "exit_code", None)
        if not isinstance(code, int):
            raise
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    app.run(main_with_exit_status)
