"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import pathlib


@contextlib.contextmanager
def replaced_atomically(path):
    """Yields a temporary path beside `path` to write; when the block succeeds, one rename puts
    it in place, so readers (other processes, a resumed run) see the old file or the new one,
    never half of one. On failure the temporary file is removed and `path` is untouched."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")  # keeps the suffix: np.savez adds none
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
