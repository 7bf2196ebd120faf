"""The run folder: usable before anything is computed, one run at a time, and resumed only
with the settings it was trained with.

- `open_workdir`: created and proven writable up front (root ignores permission bits, so
  writability is tested by writing), not after an epoch when the first checkpoint is due.
- `workdir_lock`: an advisory `flock` on WORKDIR/.lock, so two runs never interleave their
  checkpoints; the kernel drops it when the holder exits, even on a crash.
- `record_config`, `check_resume_config`: WORKDIR/config.json records what was trained; a
  resume that would silently train something else (another model, rate or batch) stops and
  says which keys.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import tempfile

from cnn_jax import config as config_lib, optim
from cnn_jax.config import WORKDIR, Set, SettingError, literal
from cnn_jax.files import replaced_atomically

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
SHOWN = 3  # differing keys listed in an error; the rest are counted

# Which keys change what is trained: config.WATCHING, config.LENGTH, config.NOT_RECORDED.
LENGTH_SCHEDULES = ("cosine",)  # schedules whose shape depends on the run's length


class WorkdirError(SettingError):
    """A run folder that cannot be used; the message is one line naming the workdir and the fix."""


def open_workdir(path) -> pathlib.Path:
    """`path` as an absolute folder, created if needed and proven writable."""
    workdir = pathlib.Path(path).expanduser().absolute()
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError("is a file, not a folder: choose another {0}", WORKDIR, key=_given(path))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"cannot be created ({_reason(err)}): choose a folder you can write to as {{0}}",
                           WORKDIR, key=_given(path)) from None
    try:
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
            pass
    except OSError as err:
        raise WorkdirError(f"is not writable ({_reason(err)}): fix its permissions or choose another {{0}}",
                           WORKDIR, key=_given(path)) from None
    return workdir


def _given(path) -> Set:
    return Set("workdir", str(path), argument=True)


def _reason(err: OSError) -> str:
    if isinstance(err, FileExistsError) or err.errno == errno.ENOTDIR:
        return "a parent is a file"
    return err.strerror or type(err).__name__


@contextlib.contextmanager
def workdir_lock(workdir):
    """Holds WORKDIR/.lock for the block; a second holder gets a one-line `WorkdirError`
    naming the first (pid and host). With several processes only process 0 should hold it."""
    path = pathlib.Path(workdir) / LOCK_FILE
    try:
        handle = open(path, "a+")  # noqa: SIM115 (closed below: closing releases the lock)
    except OSError as err:  # e.g. left read-only by another user's run
        raise WorkdirError(f"its lock file {literal(path)} cannot be opened ({_reason(err)}): fix its "
                           "permissions, or choose another {0}", WORKDIR) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirError(f"another run ({_holder(path)}) is using {literal(workdir)}: wait for it or "
                               "choose another {0}", WORKDIR) from None
        except OSError as err:  # a file system without locks (some network mounts)
            raise WorkdirError(f"{literal(workdir)} cannot be locked ({_reason(err)}): choose a folder on a "
                               "local disk as {0}", WORKDIR) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        try:
            yield path
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _holder(path: pathlib.Path) -> str:
    try:
        pid, host = path.read_text().split()[:2]
    except (OSError, ValueError):
        return "unknown process"
    return f"pid {pid} on host {host}"


def _flat(config, prefix: str = "") -> dict:
    """{'model.dtype': 'float32', ...} with JSON values (tuples become lists)."""
    config = config.to_dict() if hasattr(config, "to_dict") else config
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) or hasattr(value, "to_dict"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return {k: v for k, v in out.items() if k not in config_lib.NOT_RECORDED}


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def trains_differently(key: str, saved: dict, now: dict) -> bool:
    """Whether a change of `key` changes what is trained (rather than how it is watched)."""
    if key in config_lib.LENGTH:
        return any(_length_shaped(c) for c in (saved, now))
    return key not in config_lib.WATCHING and not key.startswith(config_lib.OWN_BLOCKS)


def _length_shaped(config: dict) -> bool:
    """Whether the learning-rate schedule is laid out over the run's length: cosine, or steps
    at fractions of the run (0.75 = three quarters through), which move when the length does."""
    if config.get("schedule") in LENGTH_SCHEDULES:
        return True
    fractions = any(optim.is_fraction(b) for b in config.get("step_boundaries") or ())
    return config.get("schedule") == "step" and fractions


def compare_configs(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(training changes, harmless changes), each as 'key: saved -> now' (flat dicts).
    Keys only one side has (the code gained or lost a key) are harmless."""
    training, harmless = [], []
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key, "(absent)"), now.get(key, "(absent)")
        if old == new:
            continue
        both = key in saved and key in now
        line = f"{key}: {_show(old)} -> {_show(new)}"
        (training if both and trains_differently(key, saved, now) else harmless).append(line)
    return training, harmless


def write_json_atomic(path: pathlib.Path, data: dict):
    """Readers see the old file or the new one, never half of one."""
    with replaced_atomically(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def record_config(config, workdir):
    """Writes WORKDIR/config.json: what this run trains, read by `check_resume_config`."""
    write_json_atomic(pathlib.Path(workdir) / CONFIG_FILE, _flat(config))


def check_resume_config(config, workdir, *, allow_change: bool) -> list[str]:
    """Against WORKDIR/config.json (`record_config`), when there is one: refuses changes that
    alter what is trained (unless `allow_change`) and returns the allowed changes as notes
    ('log_every_steps: 10 -> 5'). Writes nothing."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    now = _flat(config)
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WorkdirError(f"{literal(path)} cannot be read ({literal(err)}): restore it, delete it to accept the "
                           "current settings, or choose another {0}", WORKDIR) from None
    training, harmless = compare_configs(saved, now)
    if training and not allow_change:
        more = f" (+{len(training) - SHOWN} more)" if len(training) > SHOWN else ""
        raise WorkdirError(f"was trained with other settings: {literal('; '.join(training[:SHOWN]))}{more}: "
                           "use the saved values, another {0}, or {1}", WORKDIR, Set("allow_config_change", True),
                           key=_given(workdir))
    return training + harmless
