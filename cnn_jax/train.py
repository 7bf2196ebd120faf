"""`train_and_evaluate(config, workdir)`: the training loop over a run's pieces.

The pure steps (`TrainState`, `train_step`, `eval_step`) live in `cnn_jax.steps` and are
re-exported here; the run's pieces are built by `cnn_jax.builders`.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from cnn_jax import builders, checks, evaluate, optim, parallel, transfer, viz
from cnn_jax import workdir as workdirs
from cnn_jax.checkpoint import CheckpointError, Checkpointer
from cnn_jax.config import WORKDIR, Set, literal
from cnn_jax.data import pipeline
from cnn_jax.signals import RunStopped, StopSignals
from cnn_jax.steps import (TrainState, _plateau_arrays, all_finite, create_train_state, eval_step,  # noqa: F401
                           loss_and_metrics, train_step)
from cnn_jax.timing import StepClock
from cnn_jax.train_log import NonFiniteLossError, TrainLog
from cnn_jax.writers import MetricWriter, warnings_log

__all__ = ["RunStopped", "NonFiniteLossError", "TrainState", "create_train_state", "train_step", "eval_step",
           "loss_and_metrics", "train_and_evaluate"]


def _after_eval(state: TrainState, error: float, config) -> TrainState:
    """The paper's schedule: divide the rate by 10 when validation error stops improving."""
    if config.schedule != "plateau":
        return state
    plateau = optim.plateau_update(state.plateau, error, patience=config.plateau_patience,
                                   factor=config.lr_drop_factor, max_drops=config.plateau_max_drops)
    if plateau.scale != float(state.plateau.scale):
        logging.info("validation error %.4f did not improve: learning rate x%g", error, plateau.scale)
    return state.replace(plateau=_plateau_arrays(plateau),
                         opt_state=optim.set_lr_scale(state.opt_state, plateau.scale))


class Run:
    """One training run's pieces (`builders.Data`, `builders.Training`, the checkpointer and the
    metric writer), built after every check passed; closed on every path."""

    def __init__(self, config, workdir: pathlib.Path, stack: contextlib.ExitStack):
        self.config, self.workdir = config, workdir
        self.processes, self.process = jax.process_count(), jax.process_index()
        self.mesh = parallel.make_mesh(tuple(config.mesh) or None)
        self.data = data = builders.build_data(config, self.process, self.processes)
        root_key = jax.random.key(config.seed)
        self.training, described = builders.build_state(config, data, self.mesh, jax.random.fold_in(root_key, 0))
        if described and self.process == 0:
            print(described)
        self.train_store, self.eval_store, self.prep, self.stream = (data.train_store, data.eval_store, data.prep,
                                                                     data.stream)
        self.workers, self.total_steps, self.eval_every = data.workers, data.total_steps, data.eval_every
        self.model, self.state, self.runner = self.training.model, self.training.state, self.training.runner
        self.step_key = jax.random.fold_in(root_key, 1)
        self.ckpt = Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint_every_steps,
                                 keep=config.keep_checkpoints)
        stack.callback(self.ckpt.close)
        self.writer = stack.enter_context(MetricWriter(workdir, enabled=self.process == 0))

    def start_from(self, source: str, state):
        """The fresh (canonical) `state` with the weights of `source`, as `transfer.start_state` says."""
        state, start = transfer.start_state(state, source, self.model, self.config.new_head)
        if self.process == 0:
            print(start.describe())
            if not pathlib.Path(source).is_dir() and self.config.normalize != "imagenet":
                print(f"note: torchvision's weights were trained on inputs normalised by ImageNet's channel means "
                      f"and deviations (normalize='imagenet'); this run uses normalize={self.config.normalize!r}")
        return jax.device_put(state, self.runner.state_shardings)

    def evaluate(self, state, crops: str = "centre") -> dict:
        """Mean loss and errors over the eval split; this process reads only its share."""
        size, limit = self.config.eval_batch_size, self.config.eval_limit
        batches = pipeline.eval_batches(self.eval_store, batch_size=size, limit=limit, shard_index=self.process,
                                        shard_count=self.processes, workers=self.workers)
        count = min(len(self.eval_store), limit or len(self.eval_store))
        sums, queued = None, None
        with tqdm(total=-(-count // size), unit="batch", desc=f"evaluating ({crops} crop{'s' * (crops == 'ten')})",
                  leave=False, dynamic_ncols=True, disable=self.process != 0) as bar:
            for batch in batches:
                out = self.runner.eval(state, self.runner.place_eval(batch), self.prep, crops)
                sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
                if queued is not None:  # one batch in flight: the bar counts finished batches
                    jax.block_until_ready(queued)
                    bar.update(1)
                queued = sums
            sums = jax.device_get(sums)
            bar.update(1)
        return evaluate.summarise(sums, self.model.num_classes)

    def save(self, step: int, state):
        """Saves `state` unless it holds a NaN or inf: the last finite checkpoint stays the newest."""
        if not bool(all_finite((state.params, state.opt_state))):
            raise NonFiniteLossError(f"the parameters became NaN or infinite by step {step}; not saved. The newest "
                                     f"finite checkpoint is {self.newest()}: lower {{0}} (with {{1}}) and rerun "
                                     "to resume from it", Set("learning_rate"), Set("allow_config_change", True))
        self.ckpt.save(step, self.runner.host_state(state))

    def newest(self) -> str:
        step = self.ckpt.latest_step()
        return f"{self.ckpt.directory}/{step}" if step is not None else "none (the run starts over)"


def train_and_evaluate(config, workdir) -> dict:
    """Trains `config` in `workdir`, resuming from its newest checkpoint; returns final metrics.

    Every check runs before any data is read. Writes workdir/config.json, checkpoints (orbax),
    tensorboard/ and metrics.jsonl. SIGINT and SIGTERM save the current step and raise
    `RunStopped`. Runs on every device (`config.mesh`, `config.parallel`); with several
    processes each reads its own share of every batch.
    """
    parallel.use_compilation_cache(config.compilation_cache)
    parallel.initialize_distributed(config.distributed, config.coordinator_address, config.num_processes,
                                    config.process_id, config.distributed_timeout)
    config = checks.check_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    first = jax.process_index() == 0
    workdir = workdirs.open_workdir(workdir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings_log(workdir, enabled=first))
        if first:
            stack.enter_context(workdirs.workdir_lock(workdir))
        for note in workdirs.check_resume_config(config.to_dict(), workdir, allow_change=config.allow_config_change):
            print(f"config changed since the last run: {note}")
        run = Run(config, workdir, stack)
        return _train(run, stack)


def _train(run: Run, stack: contextlib.ExitStack) -> dict:
    config = run.config
    state, resumed = run.ckpt.restore_latest(run.state, set_aside=run.process == 0)
    if run.process == 0 and not config.eval_only:  # recorded once data, state and checkpoint are read: a
        workdirs.record_config(config.to_dict(), run.workdir)  # start that failed on its input blocks no fixed command
    step = 0
    if resumed is not None:
        step = resumed
        print(f"resumed from {run.ckpt.directory}/{resumed} (step {step} of {run.total_steps})"
              + (" (init_from applies to a fresh run only)" if config.init_from else ""))
    elif config.init_from:
        state = run.start_from(config.init_from, state)
    state = run.runner.place_state(state)
    if config.eval_only:
        if resumed is None and not config.init_from:
            raise CheckpointError(f"no checkpoint in {literal(run.ckpt.directory)}; train first, point {{0}} at a "
                                  "run, or give weights with {1}", WORKDIR, Set("init_from"), key="eval_only")
        host = run.runner.host_state(state)
        return {"step": step, **run.evaluate(host),
                **{f"ten_crop_{k}": v for k, v in run.evaluate(host, "ten").items()}}
    if step >= run.total_steps and resumed is not None:
        print(f"the run in {run.workdir} already finished step {run.total_steps}: evaluating it; raise "
              "num_epochs or num_train_steps to train further (with allow_config_change where the schedule "
              "is laid out over the run)")
    stop = stack.enter_context(StopSignals())
    clock = StepClock()
    stack.callback(clock.close)
    feed = pipeline.DeviceFeed(run.stream.batch, step, run.runner.place, workers=run.workers) \
        if step < run.total_steps else None
    if feed is not None:
        stack.callback(feed.close)
    bar = stack.enter_context(tqdm(total=run.total_steps, initial=step, unit="step", dynamic_ncols=True,
                                   desc=f"{config.model_name} on {config.dataset}"))
    log, result, saved, stopping = TrainLog(run.writer, clock, bar, batch_size=config.batch_size, newest=run.newest), {}, resumed, False
    while step < run.total_steps:
        # One process decides alone; several stop together, at a log step they agreed on.
        if stopping or (run.processes == 1 and stop.signum is not None):
            break
        batch, sent = feed.next(), time.perf_counter()
        state, stats = run.runner.step(state, batch, run.step_key, run.prep)
        step += 1
        clock.dispatched(step, stats, sent)
        log.add(stats)
        clock.wait(step - 2)  # at most two steps queued on the device
        log.read(step - 2)
        bar.update(1)
        if step % config.log_every_steps == 0 or step == run.total_steps:
            log.close(step)
            if run.processes > 1 and parallel.any_process(stop.signum is not None):
                stopping, stop.signum = True, stop.signum or signal.SIGTERM
        if step % run.eval_every == 0 or step == run.total_steps:
            log.drain(step)
            host = run.runner.host_state(state)
            result = run.evaluate(host)
            run.writer.write(step, {f"eval/{k}": v for k, v in result.items()})
            bar.write(_eval_line(step, result))
            if step % run.eval_every == 0:  # the cadence alone drives the schedule, so a run cut
                # short and resumed equals an uninterrupted one
                updated = _after_eval(host, result["top1_error"], config)
                if updated is not host:  # the plateau rule's new state; any other schedule keeps
                    # training on the runner's state, never copied back from the host
                    state = run.runner.place_state(jax.device_put(updated, run.runner.state_shardings))
            clock.pause()
            log.restart()
        if run.ckpt.should_save(step) or step == run.total_steps:
            log.drain(step)
            run.save(step, state)  # its host time counts against the loop's images/s, as it should,
            saved = step  # but the device idling meanwhile is the save's doing, not data wait
            clock.pause()
    if stop.signum is not None and step < run.total_steps:
        log.drain(step)
        if saved != step:
            run.save(step, state)
        run.ckpt.wait()
        name = signal.Signals(stop.signum).name
        bar.write(f"{name}: saved step {step} to {run.ckpt.directory}; run the same command to resume")
        raise RunStopped(stop.signum)
    run.ckpt.wait()
    host = run.runner.host_state(state)
    if not result:  # resumed at the end: evaluate what was restored
        result = run.evaluate(host)
    outputs = {"checkpoints": str(run.ckpt.directory), "tensorboard": str(run.writer.tb_dir),
               "metrics_log": str(run.writer.jsonl_path)}
    if run.process == 0:
        outputs["curves"] = str(viz.save_curves(run.writer.jsonl_path, run.workdir / "curves.png"))
    if run.process == 0 and _has_rgb_conv1(host.params):
        outputs["conv1_kernels"] = str(viz.save_conv1_figure(jax.device_get(host.params),
                                                             run.workdir / "conv1_kernels.png", step=step))
    return {"step": step, **result, "workdir": str(run.workdir), **outputs}


def _eval_line(step: int, result: dict) -> str:
    line = (f"step {step}: validation top-1 error {result['top1_error']:.1%}, "
            f"{evaluate.top5_text(result)}, loss {result['loss']:.3f}")
    if result.get("nonfinite"):
        line += f" ({result['nonfinite']:.0%} of outputs NaN or infinite, counted as errors)"
    return line


def _has_rgb_conv1(params) -> bool:
    kernel = params.get("conv1", {}).get("kernel") if hasattr(params, "get") else None
    return kernel is not None and kernel.shape[-2] == 3
