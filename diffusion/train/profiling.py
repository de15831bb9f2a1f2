"""A `jax.profiler` trace of a window of train steps, for TensorBoard's Profile tab.

`train.profile_steps = "START,END"` traces the steps whose state.step lies in
[START, END): the trace starts just before step START is dispatched and stops once step
END - 1 has finished on the device. It is written under `WORKDIR/plugins/profile/<run>/`
(`*.xplane.pb`), where `tensorboard --logdir WORKDIR` finds it (the Profile tab needs
the `tensorboard-plugin-profile` package). Leave a few steps after compilation before
START (e.g. "10,15") so the window shows steady-state steps, not the first dispatch.

The loop uses it as a context manager that it calls before each step:

    with StepProfiler(c.train.profile_steps, workdir) as profiler:
        while step < num_steps:
            profiler.before_step(step, state)
            state, metrics = train_step(state, batch)
            step += 1
        profiler.finish(state)

`finish` waits for the last steps when the window runs past the end of training;
leaving the block any other way (an exception, SIGTERM) stops an open trace as is.
"""
from __future__ import annotations

import logging
from typing import Any

import jax

log = logging.getLogger(__name__)


def parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
    """"START,END" -> (START, END) with 0 <= START < END; "" or None -> None (off)."""
    if spec is None or str(spec).strip() == "":
        return None
    parts = str(spec).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        start, end = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(f"train.profile_steps must be 'START,END' (two integers, e.g. "
                         f"'10,15'), or '' for off; got {spec!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"train.profile_steps={spec!r}: need 0 <= START < END")
    return start, end


class StepProfiler:
    """Starts a jax.profiler trace at step START and stops it after step END - 1."""

    def __init__(self, spec: str | None, log_dir: str):
        self.window = parse_profile_steps(spec)
        self.log_dir = log_dir
        self.active = False

    def __enter__(self) -> "StepProfiler":
        return self

    def before_step(self, step: int, state: Any = None) -> None:
        """Call with the index of the step about to be dispatched (= state.step) and the
        state it will read. Stopping waits for `state`, i.e. for the traced steps to run."""
        if self.window is None:
            return
        start, end = self.window
        if step == start and not self.active:
            jax.profiler.start_trace(self.log_dir)
            self.active = True
            log.info("profiling steps %d to %d into %s/plugins/profile", start, end - 1,
                     self.log_dir)
        elif step == end and self.active:
            if state is not None:
                jax.block_until_ready(state)
            self._stop()

    def finish(self, state: Any = None) -> None:
        """After the last step: waits for `state` and stops a trace still open."""
        if self.active:
            if state is not None:
                jax.block_until_ready(state)
            self._stop()

    def _stop(self) -> None:
        self.active = False
        jax.profiler.stop_trace()
        log.info("profile written under %s/plugins/profile (TensorBoard: Profile tab)",
                 self.log_dir)

    def __exit__(self, *exc) -> None:
        # An error or SIGTERM inside the window: keep what was traced. The state may
        # have been donated already, so there is nothing safe to wait on.
        if self.active:
            self._stop()
