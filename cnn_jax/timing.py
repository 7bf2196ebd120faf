"""How long the device sat without work, measured without making the host wait.

A watcher thread blocks on each step's outputs in order and notes when the device finished
them. For step n dispatched at d(n), with step n-1 finished at f(n-1): the device was idle
for max(0, d(n) - f(n-1)) (no batch, or the host busy elsewhere) and busy for
f(n) - max(d(n), f(n-1)). `data_wait` is the idle share of a window of steps; pauses the loop
declares (evaluation, checkpoints) are left out.
"""

from __future__ import annotations

import queue
import threading
import time

import jax


class StepClock:
    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Condition()
        self._finished = 0  # the last step whose outputs are ready
        self._started: int | None = None
        self._last_done: float | None = None
        self._idle = self._busy = 0.0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._watch, name="step_clock", daemon=True)
        self._thread.start()

    def dispatched(self, step: int, outputs, sent: float) -> None:
        """`sent`: perf_counter() just before the step was called (a synchronous step, as under
        pmap, returns only when done: the call's own time is work, not idle)."""
        with self._lock:
            if self._started is None:  # a resumed run starts counting at its own step
                self._started = self._finished = step - 1
        self._queue.put((step, outputs, sent))

    def pause(self) -> None:
        """The next step's idle time is the loop's own doing (evaluation, saving): not data wait."""
        self._queue.put(None)

    def _watch(self):
        while True:
            item = self._queue.get()
            if item is None:
                self._last_done = None
                continue
            if item == "stop":
                return
            step, outputs, sent = item
            try:
                jax.block_until_ready(outputs)
            except BaseException as err:  # noqa: BLE001 - wait() returns on it; the loop's next read raises it
                self._error = err
            done = time.perf_counter()
            with self._lock:
                start = sent if self._last_done is None else max(sent, self._last_done)
                if self._last_done is not None:
                    self._idle += max(0.0, sent - self._last_done)
                self._busy += done - start
                self._last_done, self._finished = done, step
                self._lock.notify_all()

    def wait(self, step: int) -> None:
        """Blocks until `step` has finished on the device (bounds how far the host runs ahead)."""
        with self._lock:
            self._lock.wait_for(lambda: self._finished >= step or self._error is not None)

    def take(self) -> float:
        """The idle share since the last call (0 when nothing was measured), and resets."""
        with self._lock:
            idle, busy = self._idle, self._busy
            self._idle = self._busy = 0.0
        return idle / (idle + busy) if idle + busy > 0 else 0.0

    def close(self) -> None:
        self._queue.put("stop")
        self._thread.join(timeout=60)
