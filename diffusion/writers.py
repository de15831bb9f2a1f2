"""Metric logging: TensorBoard event files (tensorboardX) plus `metrics.jsonl`, and
console progress with an ETA.

TensorFlow is not needed: tensorboardX writes the event files, and the
`tensorboard` package reads them. On processes other than 0 a writer is built with
`enabled=False` and does nothing, so callers need no `if process_index() == 0`.

`metrics.jsonl` gets one JSON object per `write_scalars` call,
{"step": s, "<tag>": value, ...}; non-finite values are written as Python's json
does (NaN, Infinity), which pandas and `json.loads` read back.

Nothing logged is lost and nothing hangs: each jsonl line is flushed and fsynced as
it is written (a SIGKILL loses no logged step); event records are written from the
calling thread rather than tensorboardX's queue thread, whose death on a full disk
used to block the training loop forever; a failed write raises
`diffusion.io_errors.WriteFailed` naming the file and the free space. A writer built
with `resume_step=k` (a run resumed from step k) drops the jsonl lines of steps after
k, which the run is about to redo, and tells TensorBoard to purge those steps too.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any, Callable, Mapping

import numpy as np

from diffusion import images as images_lib
from diffusion.io_errors import guard

HParamValue = bool | int | float | str


def flatten_dict(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; works for ConfigDicts (anything with .items())."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if hasattr(v, "items"):
            out.update(flatten_dict(v, key, sep))
        else:
            out[key] = v
    return out


def _hparam_value(v: Any) -> HParamValue:
    """The hparams plugin stores bool, number or string: everything else becomes str."""
    if isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float, np.integer, np.floating)):
        v = v.item() if isinstance(v, np.generic) else v
        # tensorboardX warns on non-finite numbers (e.g. sample.s_tmax = inf): keep as text.
        return v if math.isfinite(v) else str(v)
    return str(v)


def _image_for_tb(x: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C] for TensorBoard from [H, W, C] or [N, H, W, C], float or uint8."""
    x = np.asarray(x)
    if x.ndim == 4:
        return images_lib.make_grid(x)
    if x.ndim == 3:
        return images_lib.to_uint8(x)
    raise ValueError(f"image must be [H, W, C] or [N, H, W, C], got shape {x.shape}")


class _SyncEventFileWriter:
    """tensorboardX's EventFileWriter interface, writing in the caller's thread."""

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter
        self._logdir = logdir
        # EventsWriter names the file by the second and truncates an existing one: a
        # relaunch within the same second must not wipe the previous events.
        prefix, n, suffix = os.path.join(logdir, "events"), 0, ""
        while any(f.startswith("events.out.tfevents.") and f.endswith(
                f".{socket.gethostname()}{suffix}") and
                f[len("events.out.tfevents."):][:10] == str(time.time())[:10]
                for f in os.listdir(logdir)):
            n += 1
            suffix = f".{n}"
        self._events = EventsWriter(prefix, suffix)
        self.path = self._events._file_name
        self._closed = False

    def get_logdir(self) -> str:
        return self._logdir

    def add_event(self, event) -> None:
        if not self._closed:
            with guard(self.path):
                self._events.write_event(event)

    def flush(self) -> None:
        if not self._closed:
            with guard(self.path):
                self._events.flush()  # flush + fsync

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with guard(self.path):
                self._events.close()

    def reopen(self) -> None:
        pass


def _import_tensorboardx() -> None:
    """Imports tensorboardX without torch. tensorboardX imports torch whenever it is
    installed, only to accept torch tensors (nothing here passes one); that import is
    2.5 s of every process start. With torch masked in sys.modules while tensorboardX
    loads, it falls back to numpy; an `import torch` anywhere later works as usual."""
    import importlib
    import sys
    if "tensorboardX.writer" in sys.modules:
        return
    masked = "torch" not in sys.modules
    if masked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        importlib.import_module("tensorboardX.writer")
    finally:
        if masked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def _summary_writer(logdir: str, purge_step: int | None):
    """A tensorboardX SummaryWriter whose file writer is synchronous (no queue thread)."""
    _import_tensorboardx()
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.writer import FileWriter

    class _FileWriter(FileWriter):
        def __init__(self, logdir):  # no super().__init__: that starts the queue thread
            self.event_writer = _SyncEventFileWriter(logdir)
            self._default_metadata = {}

    class _SummaryWriter(SummaryWriter):
        def _get_file_writer(self):
            if self.all_writers is None or self.file_writer is None:
                self.file_writer = _FileWriter(self.logdir)
                if self.purge_step is not None:  # what SummaryWriter itself writes
                    self.file_writer.add_event(
                        Event(step=self.purge_step, file_version="brain.Event:2"))
                    self.file_writer.add_event(Event(
                        step=self.purge_step, session_log=SessionLog(status=SessionLog.START)))
                self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
            return self.file_writer

    return _SummaryWriter(logdir=logdir, purge_step=purge_step)


def _truncate_jsonl(path: str, resume_step: int) -> None:
    """Keeps the lines of steps <= resume_step (and drops a torn last line)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        if not line.endswith("\n"):
            continue  # torn by a kill mid-write
        try:
            step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue
        if step <= resume_step:
            keep.append(line)
    if len(keep) == len(lines):
        return
    tmp = path + ".tmp"
    with guard(path):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class MetricWriter:
    """Writes scalars, images, text and hparams to `workdir` (TensorBoard + jsonl).

    resume_step: the step a resumed run restarts from; logs of later steps (written
    before an interruption, about to be redone) are dropped. None: keep everything.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            _truncate_jsonl(self._jsonl_path, resume_step)
        # Imported here: tensorboardX imports torch when it is installed (seconds),
        # which disabled writers on other processes and users of Progress skip.
        with guard(workdir):
            self._tb = _summary_writer(
                workdir, None if resume_step is None else resume_step + 1)
            # Append: a resumed run continues the same file.
            self._jsonl = open(self._jsonl_path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(step)
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        with guard(self._jsonl_path):
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        self._tb.flush()  # once per logged step: a full disk shows up now, not at exit

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value: uint8/float [H, W, C], or [N, H, W, C] tiled into a grid."""
        if not self.enabled:
            return
        for k, x in images.items():
            self._tb.add_image(k, _image_for_tb(x), int(step), dataformats="HWC")
        self._tb.flush()

    def write_text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        self._tb.add_text(tag, text, int(step))

    def write_hparams(self, hparams: Mapping[str, Any],
                      metric_tags: tuple[str, ...] = ()) -> None:
        """Records a (nested) config for TensorBoard's HParams dashboard.

        Nested keys are flattened with '.'; values that are not bool, number or
        string are stored as strings. `metric_tags` names scalar tags the dashboard
        should show next to the hparams.
        """
        if not self.enabled:
            return
        from tensorboardX.summary import hparams as hparams_summary
        flat = {k: _hparam_value(v) for k, v in flatten_dict(hparams).items()}
        experiment, session_start, _ = hparams_summary(flat, {t: 0.0 for t in metric_tags})
        # No session-end summary: the run is starting, not finished.
        self._tb.file_writer.add_summary(experiment)
        self._tb.file_writer.add_summary(session_start)

    def flush(self) -> None:
        if not self.enabled:
            return
        self._tb.flush()
        with guard(self._jsonl_path):
            self._jsonl.flush()

    def close(self) -> None:
        """Closes both files, even when the first close fails (then raises its error)."""
        if not self.enabled or self._tb is None:
            return
        tb, jsonl = self._tb, self._jsonl
        self._tb = self._jsonl = None
        self.enabled = False
        try:
            tb.close()
        finally:
            with guard(self._jsonl_path):
                jsonl.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    """14m02s, 1h05m09s, 42s."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    """Console progress: "step 120/3000 loss 0.0312 3.4 steps/s ETA 14m02s".

    The rate is an exponential moving average of steps/s between consecutive
    `update` calls. The first call only starts the clock: the time before it
    holds compilation, which would make the early ETA far too long.
    """

    def __init__(self, total_steps: int, *, smoothing: float = 0.9,
                 print_fn: Callable[[str], None] | None = print,
                 clock: Callable[[], float] = time.perf_counter):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.total_steps = total_steps
        self.smoothing = smoothing
        self._print = print_fn
        self._clock = clock
        self._last: tuple[int, float] | None = None
        self.rate: float | None = None  # smoothed steps/s

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        now = self._clock()
        if self._last is not None and step > self._last[0] and now > self._last[1]:
            inst = (step - self._last[0]) / (now - self._last[1])
            self.rate = inst if self.rate is None else (
                self.smoothing * self.rate + (1.0 - self.smoothing) * inst)
        self._last = (step, now)

        parts = [f"step {step}/{self.total_steps}"]
        for k, v in (metrics or {}).items():
            parts.append(f"{k} {float(np.asarray(v)):.4g}")
        if self.rate is None:
            parts.append("-- steps/s ETA --")
        else:
            rate = f"{self.rate:.1f}" if self.rate >= 1 else f"{self.rate:.3g}"
            eta = max(self.total_steps - step, 0) / self.rate
            eta_str = format_duration(eta) if math.isfinite(eta) else "--"
            parts.append(f"{rate} steps/s ETA {eta_str}")
        line = " ".join(parts)
        if self._print is not None:
            self._print(line)
        return line
