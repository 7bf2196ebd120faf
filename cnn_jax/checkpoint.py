"""Checkpoints on orbax: train state and data-stream position, every N steps and at the end.

Resuming takes the newest *readable* step: orbax reports a damaged finished step (a file
deleted or truncated) as the latest and then fails to read it, so `restore_latest` falls
back to older steps with a warning rather than crash or start over.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from cnn_jax.data.pipeline import iterator_restore_args, iterator_save_args


class Checkpointer:
    """Saves {'state': train state, 'data': iterator position} under `directory`."""

    def __init__(self, directory, *, every_steps: int, keep: int):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
        """Saves (asynchronously) when `step` is on the interval or `force`; True if it did."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = iterator_save_args(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, state, data_iter=None):
        """(state, step) from the newest readable checkpoint, or (state, None) if there is none.

        Raises RuntimeError, touching nothing, when checkpoints exist but none can be read.

        `state` gives the structure, shapes and shardings to restore into; `data_iter` is
        moved to the saved position in place.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract)}
            if data_iter is not None and self._has_stream_for_this_process(step):
                items["data"] = iterator_restore_args(data_iter)
            elif data_iter is not None:
                logging.warning("checkpoint %d was written by a different number of processes: the "
                                "train state is restored, the data stream restarts from its seed", step)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # noqa: BLE001 - any damage: try the previous step
                logging.warning("checkpoint %s/%d is unreadable (%s: %s); trying an older one",
                                self.directory, step, type(err).__name__, str(err).splitlines()[0][:200])
                damaged.append(step)
                continue
            self._set_aside(damaged)
            return restored["state"], step
        if self.manager.all_steps():
            raise RuntimeError(f"no checkpoint in {self.directory} can be read (steps "
                               f"{sorted(self.manager.all_steps())}); they are left untouched: move them "
                               "away or choose another --workdir")
        return state, None

    def _has_stream_for_this_process(self, step: int) -> bool:
        """grain keeps one stream position per process: only usable with the same count."""
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / "data" / name).exists()

    def _set_aside(self, steps):
        """Renames unreadable steps to `unreadable-N` (kept for inspection) so training can
        write those step numbers again."""
        for step in steps:
            target = self.directory / f"unreadable-{step}"
            (self.directory / str(step)).rename(target)
            logging.warning("moved the unreadable checkpoint to %s", target)
        if steps:
            self.manager.reload()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
