"""Where the tools write what they measured: asked before the minutes or hours of work that
produce it, so that no measurement is lost to a path found unwritable at the end."""

from __future__ import annotations

import errno
import os
import pathlib
import tempfile

from experiments.reproductions import rewrite


def destination(out: pathlib.Path) -> pathlib.Path:
    """The file `out` names, symbolic links and '..' resolved: what is checked is what is written.
    OSError where it names none (a loop of links)."""
    try:
        target = out.resolve()
    except RuntimeError as err:  # Python before 3.13 reports a loop of links so
        raise OSError(errno.ELOOP, str(err)) from None
    if target.is_symlink():  # and 3.13 leaves it unresolved
        raise OSError(errno.ELOOP, "a loop of symbolic links")
    return target


def unwritable(out: pathlib.Path) -> str | None:
    """Why results cannot be written to `out` (a folder, a path under a file, no permission), or
    None: asked before any run, so that an hour of runs is not lost at the end. Nothing is made
    or changed: an existing file is opened for writing without being created or written, and a
    new one's nearest existing folder takes a nameless temporary file."""
    try:
        target = destination(out)
        if target.is_dir():
            return f"--out {out} is a folder: name a file in it, e.g. --out {out / 'runs.json'}"
        if target.exists():
            if not target.is_file():
                return f"--out {out} is not a regular file: choose another --out"
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))  # no O_CREAT: makes none
            return None
        folder = next(p for p in target.parents if p.exists())
        if not folder.is_dir():
            return f"--out {out} lies under {folder}, a file, not a folder: choose another --out"
        tempfile.TemporaryFile(dir=folder).close()  # Linux: O_TMPFILE, no name ever in the folder
    except OSError as err:
        return f"--out {out} cannot be written ({err.strerror or err}): choose another --out"
    return None


def readme_unwritable(readme: pathlib.Path, begin: str, end: str) -> str | None:
    """Why the table between `begin` and `end` could not be rewritten into `readme` (not
    writable, its markers gone), or None; like `unwritable`, it changes nothing."""
    try:
        text = readme.read_text()
        os.close(os.open(readme, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
    except OSError as err:
        return f"{readme} cannot be rewritten ({err.strerror or err}): make it writable, or pass --out elsewhere"
    if begin not in text or end not in text:
        return f"{readme} has no {begin} ... {end} markers: restore them around the table, or pass --out elsewhere"
    return None


def write_table(readme: pathlib.Path, table: str, begin: str, end: str) -> None:
    readme.write_text(rewrite(readme, table, begin, end))
    print(f"wrote the table to {readme.name}")
