"""Checkpoints of the training state: one small class over orbax-checkpoint.

A checkpoint holds two items: `state`, a pytree of jax arrays (the TrainState:
step, params, opt_state, EMA params, rng), and `extra`, a JSON dict (data position,
resolved config). `Checkpointer` saves asynchronously, keeps the last K steps, and
restores arrays straight into the shardings of an abstract target, so a resumed run
never materialises the state on one device first.

What counts as a checkpoint. Orbax writes a step into `<step>.orbax-checkpoint-tmp`
and renames it to `<step>` when done (on GCS it writes into `<step>` and adds the
commit file last); in both modes the finished directory holds `commit_success.txt`.
Orbax itself only refuses the tmp name: it lists a `<step>` directory without the
commit file as a checkpoint, and while an async save is running its `latest_step()`
already reports the step being written. So this module trusts a step only when
orbax lists it *and* its commit file exists. Untrusted directories are never
restored; before the first save they are moved aside (`<step>.incomplete`) so that
a resumed run can write that step number again.

Typed PRNG keys (`jax.random.key`) are stored as their raw `key_data` (uint32) and
wrapped back on restore, so the checkpoint format does not depend on how a given
orbax version treats key dtypes.

Failures. A background save that fails (full disk, I/O error) is reported by
`check()` (cheap, non-blocking: call it every step), `wait()` and the next `save()`
as `diffusion.io_errors.WriteFailed` naming the step directory and the free space,
or as CheckpointError; orbax's own tracebacks for disk errors are not repeated.
`restore_latest()` verifies the newest finished step by restoring it (and by an
optional check of the values) and falls back to the previous one when it is corrupt
(truncated files, missing metadata), moving the bad one aside as `<step>.corrupt`;
when no step restores it moves nothing and names the newest one. Nothing is created
on disk until the first save, so a reader of an empty workdir leaves it empty.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from diffusion.io_errors import disk_errno, guard, write_failed

# Orbax's names for the tmp-directory suffix and the commit file
# (orbax/checkpoint/_src/path/atomicity_types.py); the tests check they still match.
TMP_DIR_SUFFIX = ".orbax-checkpoint-tmp"
COMMIT_FILE = "commit_success.txt"
INCOMPLETE_SUFFIX = ".incomplete"
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names its directory."""
    exit_code = 1


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


class _QuietDiskErrors(logging.Filter):
    """Drops orbax's logged tracebacks of disk errors: the run reports them once itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
        # asyncio's "Task exception was never retrieved" names orbax only in its text.
        if "orbax" not in record.pathname and "orbax" not in text:
            return True
        return disk_errno(Exception(text)) is None


_QUIET = _QuietDiskErrors()


def _one_copy_per_array() -> None:
    """In a one-process job, orbax writes each array from one device.

    Off GPU, orbax's jax.Array handler defaults to replica-parallel saving: each
    replicated array is cut into one slice per device, and each slice is its own device
    op and host copy, so that several hosts can share the write. With one process there is
    nobody to share with; on 8 CPU devices that cost 3.5 s of a tiny run's 4.3 s save
    (BENCHMARKS.md). This sets the handler orbax itself uses on GPU (replica-parallel off)
    for jax.Array, process-wide, and only when there is a single process. What is on disk
    is the same arrays; multi-process jobs keep orbax's default.
    """
    if jax.process_count() > 1:
        return
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_diffusion_one_copy", False):
        return
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,
        array_metadata_store=getattr(current, "_array_metadata_store", None))
    handler._diffusion_one_copy = True
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _quiet_closed_loop_callbacks() -> None:
    """After a failed async save, tensorstore's pending writes still call back into
    the event loop orbax has already closed; each callback's RuntimeError went through
    sys.excepthook as a full traceback (hundreds, on a full disk). Only that one
    error, raised from asyncio itself, is dropped; everything else is printed."""
    previous = sys.excepthook
    if getattr(previous, "_diffusion_quiet", False):
        return

    def hook(exc_type, exc, tb):
        frames = traceback.extract_tb(tb) if tb is not None else []
        if (exc_type is RuntimeError and str(exc) == "Event loop is closed" and frames
                and frames[-1].filename.endswith(os.path.join("asyncio", "base_events.py"))):
            return
        previous(exc_type, exc, tb)
    hook._diffusion_quiet = True
    sys.excepthook = hook

_STATE, _EXTRA = "state", "extra"


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _keys_to_data(state: Any) -> Any:
    """Replaces typed-key leaves by their uint32 key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _abstract_for_storage(abstract_state: Any) -> Any:
    """The restore target as stored: key leaves become uint32 key data, same sharding."""

    def check(path, x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            raise TypeError(
                f"restore target leaf {jax.tree_util.keystr(path)} is {type(x).__name__}, "
                "expected jax.ShapeDtypeStruct (use jax.eval_shape and attach shardings)")
        if x.sharding is None:
            raise ValueError(
                f"restore target leaf {jax.tree_util.keystr(path)} has no sharding; "
                "give every ShapeDtypeStruct the sharding it should be restored to")
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, x)
        # A PartitionSpec shorter than the rank leaves trailing dims unsharded, so the
        # key's sharding is valid for its data, which only adds trailing dims.
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)

    return jax.tree_util.tree_map_with_path(check, abstract_state)


def _data_to_keys(restored: Any, abstract_state: Any) -> Any:
    """Wraps uint32 key data back into typed keys where the target has key leaves."""

    def wrap(x, target):
        if not _is_key(target):
            return x
        # A scalar key of the target dtype is the public way to learn its impl.
        impl = jax.random.key_impl(jnp.zeros((), target.dtype))
        return jax.random.wrap_key_data(x, impl=impl)

    return jax.tree.map(wrap, restored, abstract_state)


class Checkpointer:
    """Saves and restores (state, extra) under `directory`, keeping the last K steps.

    All processes of a multi-host job construct it and call `save`/`restore`
    together; orbax coordinates which process writes what.
    """

    def __init__(self, directory: str, max_to_keep: int = 3):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=False,  # made by the first save: a reader must not create it
            enable_async_checkpointing=True,
            # Left to `_sweep` at the first save: a reader (an eval job) opening the
            # workdir must not delete the directory a running save is writing into.
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _EXTRA))
        self._swept = False
        self._in_flight: int | None = None  # step of the save not yet known to be done
        _quiet_closed_loop_callbacks()
        _one_copy_per_array()
        for name in ("absl", "orbax", "asyncio"):
            if _QUIET not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_QUIET)

    # -- queries ---------------------------------------------------------------

    def _is_committed(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_FILE).exists()

    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(s for s in self._manager.all_steps() if self._is_committed(s))

    def latest_step(self) -> int | None:
        """The newest finished step, or None; a save still in flight is not counted."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save ------------------------------------------------------------------

    def _sweep(self) -> None:
        """Removes orbax tmp dirs and moves aside step dirs without a commit file."""
        if jax.process_index() == 0:
            with guard(str(self.directory)):
                self.directory.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0 and self.directory.exists():
            for path in self.directory.iterdir():
                name = path.name
                if TMP_DIR_SUFFIX in name and path.is_dir():
                    logging.warning("removing unfinished checkpoint %s", path)
                    path.rmtree()
                elif name.isdigit() and path.is_dir() and not (path / COMMIT_FILE).exists():
                    target = path.parent / (name + INCOMPLETE_SUFFIX)
                    n = 1
                    while target.exists():
                        target = path.parent / f"{name}{INCOMPLETE_SUFFIX}{n}"
                        n += 1
                    logging.warning("checkpoint %s has no %s; moving it to %s",
                                    path, COMMIT_FILE, target)
                    path.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("diffusion_checkpoint_sweep")
        self._manager.reload()
        self._swept = True

    def save(self, step: int, state: Any, extra: dict[str, Any] | None = None,
             force: bool = False) -> bool:
        """Starts writing `state` and `extra` as `step`; returns once arrays are copied.

        The write finishes in the background; the next `save`, `wait` or `close`
        waits for it. Returns False (nothing written) when `step` is already saved,
        or, unless `force`, when it is older than the latest saved step.
        """
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        try:
            json.dumps(extra)  # fail here, not in orbax's background thread
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra is not JSON-serialisable: {e}") from e
        if not self._swept:
            self._sweep()
        # Orbax's own list includes a save in flight; that step counts as saved here.
        if step in self._manager.all_steps():
            return False
        self.wait()  # a failed previous save is reported before another is started
        args = ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(_keys_to_data(state)),
            _EXTRA: ocp.args.JsonSave(extra),
        })
        with guard(str(self.directory / str(step))):
            started = bool(self._manager.save(step, args=args, force=force))
        if started:
            self._in_flight = step
        return started

    # -- restore ---------------------------------------------------------------

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores (state, extra) of `step` (default: latest) into the target shardings.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set
        (from jax.eval_shape plus the run's shardings); typed-key leaves are allowed.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(
                f"no finished checkpoint for step {step} in {self.directory}; "
                f"finished steps: {self.all_steps()}")
        target = _abstract_for_storage(abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(target),
            _EXTRA: ocp.args.JsonRestore(),
        }))
        state = _data_to_keys(restored[_STATE], abstract_state)
        extra = restored[_EXTRA]
        return state, ({} if extra is None else dict(extra))

    def restore_latest(self, abstract_state: Any, verify: Callable[[Any], None] | None = None,
                       move_aside: bool = False) -> tuple[int, Any, dict]:
        """(step, state, extra) of the newest finished step that restores (and passes
        `verify(state)`, which raises to reject it), falling back step by step.

        With `move_aside`, each newer step that failed is renamed `<step>.corrupt`
        once an older one has restored, so the next save can reuse its number; when
        none restores, nothing is moved and the error names the newest step.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        bad: list[tuple[int, BaseException]] = []
        for step in reversed(steps):
            try:
                state, extra = self.restore(abstract_state, step)
                if verify is not None:
                    verify(state)
            except Exception as e:  # noqa: BLE001 - any failure means: try the previous
                logging.warning("checkpoint %s cannot be restored (%s); trying the "
                                "previous one", self.directory / str(step), _first_line(e))
                bad.append((step, e))
                continue
            if move_aside:
                for b, _ in bad:
                    self._move_aside(b)
            return step, state, extra
        step, e = bad[0]
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be restored; the newest, "
            f"{self.directory / str(step)}, fails with: {_first_line(e)}") from e

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            path = self.directory / str(step)
            target, n = path.parent / (path.name + CORRUPT_SUFFIX), 1
            while target.exists():
                target, n = path.parent / f"{path.name}{CORRUPT_SUFFIX}{n}", n + 1
            logging.warning("checkpoint %s is corrupt; moved it to %s", path, target)
            path.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"diffusion_checkpoint_move_aside_{step}")
        self._manager.reload()

    # -- lifecycle -------------------------------------------------------------

    def _raise_save_error(self, e: BaseException) -> None:
        step, self._in_flight = self._in_flight, None
        path = str(self.directory / str(step)) if step is not None else str(self.directory)
        err = write_failed(path, e)
        if err is not None:
            raise err from e
        raise CheckpointError(f"saving checkpoint {path} failed: {_first_line(e)}") from e

    def check(self) -> None:
        """Raises if a background save has failed; returns at once otherwise (cheap)."""
        if self._in_flight is None or self._manager.is_saving_in_progress():
            return
        self.wait()

    def wait(self) -> None:
        """Blocks until every save started so far is finished on disk; raises
        WriteFailed/CheckpointError naming the step directory when one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported with the checkpoint's name
            self._raise_save_error(e)
        self._in_flight = None

    def close(self) -> None:
        """Waits for the save in flight (raising its error) and releases orbax's threads."""
        try:
            self.wait()
        except BaseException:
            with contextlib.suppress(Exception):  # the failed save is the error to report
                self._manager.close()
            raise
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
