"""Where the tools write what they measured: asked before the minutes or hours of work that
produce it, so that no measurement is lost to a path found unwritable at the end."""

from __future__ import annotations

import errno
import os
import pathlib
import sys
import tempfile

from experiments.reproductions import rewrite


def destination(out: pathlib.Path) -> pathlib.Path:
    """The file `out` names, symbolic links and '..' resolved: what is checked is what is written.
    OSError where it names none (a loop of links, anywhere in the path)."""
    try:
        target = out.resolve()
    except RuntimeError as err:  # Python before 3.13 reports a loop of links so
        raise OSError(errno.ELOOP, str(err)) from None
    try:
        target.stat()  # 3.13 leaves a loop unresolved, and resolve() does not say so
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a loop of symbolic links") from None
    return target


def _reason(err: Exception) -> str:
    """An error's reason in a few words: the system's for an OSError, else its message."""
    return getattr(err, "strerror", None) or str(err)


def _open_without_creating(path: pathlib.Path) -> None:
    """Raises what writing `path` would (permissions, a read-only disk), yet makes and writes nothing."""
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))  # no O_CREAT


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
            _open_without_creating(target)
            return None
        folder = next(p for p in target.parents if p.exists())
        if not folder.is_dir():
            return f"--out {out} lies under {folder}, a file, not a folder: choose another --out"
        tempfile.TemporaryFile(dir=folder).close()  # Linux: O_TMPFILE, no name ever in the folder
    except OSError as err:
        return f"--out {out} cannot be written ({_reason(err)}): choose another --out"
    return None


def readme_unwritable(readme: pathlib.Path, begin: str, end: str) -> str | None:
    """Why the table between `begin` and `end` could not be rewritten into `readme` (not
    readable text, not writable, its markers gone or out of order), or None; changes nothing."""
    try:
        rewrite(readme, "", begin, end)
        _open_without_creating(readme)
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        return f"{readme} cannot take the table ({_reason(err)}): fix it, or pass --out elsewhere"
    return None


def refusal(out: pathlib.Path, default_out: pathlib.Path, readme: pathlib.Path, begin: str, end: str) -> str | None:
    """Why `out` cannot be written, or, where `out` is the README's data, the README's table
    rewritten; None when both can."""
    if why := unwritable(out):
        return why
    return readme_unwritable(readme, begin, end) if destination(out) == default_out.resolve() else None


def write_table(readme: pathlib.Path, table: str, begin: str, end: str, kept: pathlib.Path) -> None:
    """Rewrites the README's table; if the README changed since it was checked, one line that
    says where the results are kept, not a traceback."""
    try:
        readme.write_text(rewrite(readme, table, begin, end), encoding="utf-8")
    except (OSError, ValueError) as err:
        sys.exit(f"error: {readme} was not rewritten ({_reason(err)}); "
                 f"the results are kept in {kept}")
    print(f"wrote the table to {readme.name}")
