"""Metric logging: TensorBoard event files (tensorboardX) plus `metrics.jsonl`, and
console progress with an ETA.

TensorFlow is not needed: tensorboardX writes the event files, and the
`tensorboard` package reads them. On processes other than 0 a writer is built with
`enabled=False` and does nothing, so callers need no `if process_index() == 0`.

`metrics.jsonl` gets one JSON object per `write_scalars` call,
{"step": s, "<tag>": value, ...}; non-finite values are written as Python's json
does (NaN, Infinity), which pandas and `json.loads` read back.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping

import numpy as np

from diffusion import images as images_lib

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


class MetricWriter:
    """Writes scalars, images, text and hparams to `workdir` (TensorBoard + jsonl)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        # Imported here: tensorboardX imports torch when it is installed (seconds),
        # which disabled writers on other processes and users of Progress skip.
        from tensorboardX import SummaryWriter
        os.makedirs(workdir, exist_ok=True)
        self._tb = SummaryWriter(logdir=workdir, flush_secs=30)
        # Append: a resumed run continues the same file.
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(step)
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Each value: uint8/float [H, W, C], or [N, H, W, C] tiled into a grid."""
        if not self.enabled:
            return
        for k, x in images.items():
            self._tb.add_image(k, _image_for_tb(x), int(step), dataformats="HWC")

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
        self._jsonl.flush()

    def close(self) -> None:
        if not self.enabled or self._tb is None:
            return
        self._tb.close()
        self._jsonl.close()
        self._tb = self._jsonl = None
        self.enabled = False

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
