"""SIGINT and SIGTERM as requests: the loop finishes its step, saves, and stops.

A scheduler's preemption (SIGTERM) and Ctrl-C (SIGINT) set a flag instead of raising in the
middle of a step, an evaluation or a save, so the state that is saved is always one the
uninterrupted run also passes through. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """The run saved and stopped on a signal; exit with 128 + `signum`, as shells expect."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """Context manager: while inside, SIGINT/SIGTERM only set `signum` (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user wants out now
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
