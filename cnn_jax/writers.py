"""Where metrics go: TensorBoard event files and a JSON-lines log, side by side in workdir."""

from __future__ import annotations

import json
import pathlib
import time

from tensorboardX import SummaryWriter


class MetricWriter:
    """`write(step, {'train/loss': ...})` to `workdir/tensorboard` and `workdir/metrics.jsonl`.

    The JSON log is appended to, so a resumed run continues the same file.
    """

    def __init__(self, workdir, enabled: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self.tb_dir = self.workdir / "tensorboard"
        self.enabled = enabled
        self._tb = SummaryWriter(str(self.tb_dir)) if enabled else None
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8") if enabled else None

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        for key, value in clean.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()

    def close(self):
        if self.enabled and not self._jsonl.closed:
            self._tb.close()
            self._jsonl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
