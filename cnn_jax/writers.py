"""Where metrics go: TensorBoard event files and a JSON-lines log, side by side in workdir."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import time

from tensorboardX import SummaryWriter


def _drop_unfinished_line(path: pathlib.Path, chunk: int = 1 << 16):
    """Truncates `path` after its last newline (a writer killed mid-line leaves a fragment),
    reading only the file's tail."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            if pos == end and data.endswith(b"\n"):
                return
            newline = data.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            pos = start
        f.truncate(0)


class MetricWriter:
    """`write(step, {'train/loss': ...})` to `workdir/tensorboard` and `workdir/metrics.jsonl`.

    The JSON log is appended to, so a resumed run continues the same file; a last line left
    unfinished by a killed run is dropped first, so every line stays one JSON object.
    """

    def __init__(self, workdir, enabled: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self.tb_dir = self.workdir / "tensorboard"
        self.enabled = enabled
        self._tb = SummaryWriter(str(self.tb_dir)) if enabled else None
        if enabled:
            _drop_unfinished_line(self.jsonl_path)
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


LOG_FILE = "warnings.log"


@contextlib.contextmanager
def warnings_log(workdir: pathlib.Path, enabled: bool = True):
    """Every warning logged during the block (the libraries' too: tensorflow-datasets, orbax)
    appended to workdir/warnings.log, so that a console kept to what the user can act on loses
    nothing."""
    if not enabled:
        yield None
        return
    handler = logging.FileHandler(pathlib.Path(workdir) / LOG_FILE, encoding="utf-8")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(pathname)s:%(lineno)d: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.baseFilename
    finally:
        root.removeHandler(handler)
        handler.close()
