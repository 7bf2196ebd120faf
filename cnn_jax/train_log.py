"""The training loop's metrics log: per-step metrics kept on the device, read a window at a
time without draining the queue of dispatched steps, with the NaN check where they are read."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import jax
import numpy as np

from cnn_jax.config import Advice, Set
from cnn_jax.timing import StepClock


class NonFiniteLossError(Advice, RuntimeError):
    """The loss became NaN or infinite; the message gives the step."""


class TrainLog:
    """Per-step metrics kept on the device, brought to the host a window at a time.

    A window closes at each log step but is read only once the device has finished its last
    step (two steps later, when the loop's own bound on queued steps has passed it), so
    logging never drains the queue of dispatched steps; evaluating, saving and stopping
    read everything first. Reading is where NaN is caught.
    """

    def __init__(self, writer, clock: StepClock, bar, *, batch_size: int, newest: Callable[[], str]):
        """`writer.write(step, scalars)` receives each window's means; `newest()` names the newest
        checkpoint for the NaN error; `bar.set_postfix` shows loss and speed."""
        self.writer, self.clock, self.bar, self.batch_size, self.newest = writer, clock, bar, batch_size, newest
        self.window, self.closed, self.since = [], collections.deque(), time.perf_counter()

    def add(self, stats: dict):
        self.window.append(stats)

    def close(self, step: int):
        now = time.perf_counter()
        if self.window:
            self.closed.append((step, self.window, now - self.since))
        self.window, self.since = [], now

    def read(self, finished: int):
        """Logs the closed windows whose last step is at most `finished`."""
        while self.closed and self.closed[0][0] <= finished:
            self._write(*self.closed.popleft())

    def drain(self, step: int):
        self.close(step)
        self.read(step)

    def restart(self):
        """The time since the last window closed was the loop's own (evaluation): not counted."""
        self.since = time.perf_counter()

    def _write(self, step: int, window: list, seconds: float):
        values = jax.device_get(window)
        for offset, stats in enumerate(values):
            if not np.isfinite(stats["loss"]):
                failed = step - len(values) + offset + 1
                raise NonFiniteLossError(f"loss is {stats['loss']} at step {failed}; the newest checkpoint is "
                                         f"{self.newest()}: lower {{0}} (with {{1}}) or check the data, "
                                         "then rerun to resume from it", Set("learning_rate"),
                                         Set("allow_config_change", True))
        means = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
        means["data_wait"] = self.clock.take()
        means["images_per_second"] = self.batch_size * len(values) / max(seconds, 1e-9)
        self.writer.write(step, {f"train/{k}": v for k, v in means.items()})
        self.bar.set_postfix(loss=f"{means['loss']:.3f}", img_s=f"{means['images_per_second']:.0f}",
                             wait=f"{means['data_wait']:.0%}", refresh=False)
