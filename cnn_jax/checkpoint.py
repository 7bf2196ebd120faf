"""Checkpoints on orbax: the train state every N steps and at the end.

The data stream is a pure function of the step (see `data.pipeline`), so the step is the
stream's whole position: nothing else needs saving to resume it exactly.

Resuming takes the newest *readable* step: orbax reports a damaged finished step (a file
deleted or truncated) as the latest and then fails to read it, so `restore_latest` falls back
to older steps. Only real damage is set aside (renamed `unreadable-N`, by process 0, with the
reason logged): a checkpoint of another model is an error that touches nothing.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnn_jax.config import WORKDIR, Advice, literal
from cnn_jax.trees import path_name


class CheckpointError(Advice, RuntimeError):
    """Checkpoints that cannot be used; the message says which and what to do."""


def shapes(tree) -> dict:
    """{'params/conv1/kernel': shape, ...} of a tree of arrays or orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def mismatch(saved: dict, wanted: dict) -> str:
    """'' when the two shape maps agree, else a short description of the first differences."""
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    changed = [f"{k} {saved[k]} vs {wanted[k]}" for k in sorted(saved.keys() & wanted.keys())
               if saved[k] != wanted[k]]
    parts = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)})"
             for label, items in (("missing", missing), ("unexpected", extra), ("shape", changed)) if items]
    return "; ".join(parts)


def _reason(err: Exception) -> str:
    """The operating system's words when tensorstore wraps them ('No space left on device'),
    else the error's first line."""
    text = str(err)
    found = re.search(r": ([^:\[\]]+?) \[os_error_code", text)
    if found:
        return found.group(1)
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


class Checkpointer:
    """Saves the train state under `directory` every `every_steps` steps, keeping `keep`."""

    def __init__(self, directory, *, every_steps: int, keep: int):
        self.directory, self.every_steps = pathlib.Path(directory).absolute(), every_steps
        self._writing: int | None = None  # the step of the newest save, which may still be writing
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)  # the cadence: should_save
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers={"state": ocp.StandardCheckpointHandler()})

    def should_save(self, step: int) -> bool:
        """Every `every_steps` steps, counted from 0 (orbax alone would also save a fresh run's
        first step, stalling the device there)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state) -> None:
        """Saves `state` as step `step` (asynchronously). Failures (a full disk, an unwritable
        folder) raise CheckpointError; the previous checkpoints stay intact."""
        self._writing = step
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
        except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            raise self._save_error(step, err) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_error(self._writing, err) from None

    def _save_error(self, step, err) -> CheckpointError:
        kept = sorted(s for s in self.manager.all_steps() if s != step)
        return CheckpointError(f"saving checkpoint {step} to {literal(self.directory)} failed "
                               f"({literal(_reason(err))}); kept: {kept or 'none'}: free space or choose another "
                               "{0}, then rerun", WORKDIR)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, state, *, set_aside: bool = True):
        """(state, step) from the newest readable checkpoint, or (state, None) if there is none.

        `state` gives the structure, shapes and shardings to restore into. A checkpoint whose
        arrays do not match `state` (another model or optimiser) raises CheckpointError and
        touches nothing; unreadable ones are skipped, and set aside if `set_aside`.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        wanted, damaged = shapes(abstract), []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                metadata = self.manager.item_metadata(step)["state"]
            except Exception as err:  # noqa: BLE001 - unreadable metadata is damage
                damaged.append((step, err))
                continue
            differs = mismatch(shapes(metadata), wanted) if metadata is not None else ""
            if differs:
                raise CheckpointError(f"checkpoint {literal(self.directory)}/{step} holds another model or "
                                      f"optimiser ({literal(differs)}): use the run's own config, or another {{0}}",
                                      WORKDIR)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
            except Exception as err:  # noqa: BLE001 - the arrays' files are damaged
                damaged.append((step, err))
                continue
            self._set_aside(damaged, set_aside)
            return restored["state"], step
        if damaged:
            raise CheckpointError(f"no checkpoint in {literal(self.directory)} can be read (steps "
                                  f"{[s for s, _ in damaged]}); they are left untouched: move them away or "
                                  "choose another {0}", WORKDIR)
        return state, None

    def _set_aside(self, damaged, rename: bool):
        """Renames unreadable steps to `unreadable-N` (kept for inspection), so training can
        write those step numbers again."""
        for step, err in damaged:
            reason = _reason(err)
            if not rename:
                logging.warning("checkpoint %s/%d is unreadable (%s); using an older one", self.directory, step, reason)
                continue
            target = self.directory / f"unreadable-{step}"
            (self.directory / str(step)).rename(target)
            logging.warning("checkpoint %s/%d is unreadable (%s): moved to %s", self.directory, step, reason, target)
        if damaged:
            self.manager.reload()

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()


def newest_step(location) -> pathlib.Path:
    """The newest checkpoint folder (holding `state/`) under a workdir, its checkpoints/, or
    a checkpoints/<step> folder itself; FileNotFoundError if there is none."""
    location = pathlib.Path(location)
    if (location / "checkpoints").is_dir():
        location = location / "checkpoints"
    if (location / "state").is_dir():
        return location
    steps = sorted((p for p in location.iterdir() if p.name.isdigit() and (p / "state").is_dir()),
                   key=lambda p: int(p.name)) if location.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {location}: pass a workdir or checkpoints/<step>")
    return steps[-1]


def restore_as_numpy(path) -> dict:
    """A saved state as NumPy arrays, whatever devices wrote it (a plain restore insists on the
    saving run's topology, e.g. 8 devices or two towers)."""
    with ocp.PyTreeCheckpointer() as checkpointer, _absl_quiet():  # it warns of the manager's metadata file
        metadata = checkpointer.metadata(path)
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, restore_args=args)


@contextlib.contextmanager
def _absl_quiet():
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)
