"""Train state, pure train/eval steps, and `train_and_evaluate(config, workdir)`.

The steps are pure functions of (state, batch, rng): dropout keys come from
`fold_in(rng, state.step)`, not from the state, so a resumed run draws the same masks as an
uninterrupted one. Models may return logits, or a dict {'logits', 'aux_logits'} (auxiliary
heads, weighted by `aux_weight` in the loss), and may keep 'batch_stats': the step handles
all of these without model-specific branches.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pathlib
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from tqdm.auto import tqdm

from cnn_jax import evaluate, metrics, optim, transfer, viz
from cnn_jax.checkpoint import CheckpointError, Checkpointer
from cnn_jax.config import Set
from cnn_jax.data import augment, pipeline, store
from cnn_jax.data.sources import open_split
from cnn_jax.models import get_model
from cnn_jax.signals import RunStopped, StopSignals
from cnn_jax.timing import StepClock
from cnn_jax.train_log import NonFiniteLossError, TrainLog
from cnn_jax.writers import MetricWriter

__all__ = ["RunStopped", "NonFiniteLossError", "TrainState", "train_step", "eval_step", "train_and_evaluate"]


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    plateau: optim.PlateauState  # the paper's manual schedule, checkpointed with the rest
    apply_fn: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def _plateau_arrays(p: optim.PlateauState) -> optim.PlateauState:
    return optim.PlateauState(np.asarray(p.best, np.float32), np.asarray(p.bad_evals, np.int32),
                              np.asarray(p.drops, np.int32), np.asarray(p.scale, np.float32))


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple) -> TrainState:
    variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      plateau=_plateau_arrays(optim.PlateauState()), apply_fn=model.apply, tx=tx)


def _split_outputs(out):
    if isinstance(out, dict):
        return out["logits"], tuple(out.get("aux_logits", ()))
    return out, ()


def _variables(state: TrainState, params):
    return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}


def loss_and_metrics(state: TrainState, params, batch, rng, aux_weight: float):
    """Mean cross-entropy (+ aux_weight x each auxiliary head's), and batch top-1/5 error."""
    mutable = ["batch_stats"] if state.batch_stats else False
    out = state.apply_fn(_variables(state, params), batch["image"], train=True,
                         rngs={"dropout": rng}, mutable=mutable)
    out, updates = out if mutable else (out, {})
    logits, aux = _split_outputs(out)
    loss = metrics.cross_entropy(logits, batch["label"]).mean()
    for aux_logits in aux:
        loss += aux_weight * metrics.cross_entropy(aux_logits, batch["label"]).mean()
    stats = {"loss": loss, "top1_error": metrics.topk_error(logits, batch["label"], 1).mean(),
             "top5_error": metrics.topk_error(logits, batch["label"], 5).mean()}
    return loss, (stats, updates)


def train_step(state: TrainState, batch: dict, rng: jax.Array, prep, aux_weight: float = 0.3,
               axis_name: str | None = None):
    """One optimiser step. Pure: jit it with the state donated.

    `prep` (`data.augment.Preprocessor`) turns a uint8 batch of stored squares into the
    network's input on the device: mean subtraction, random crop and mirror, PCA colour
    noise. With `prep=None`, `batch['image']` is the network's input as given (your own float
    arrays). The preprocessor's draws and the dropout masks come from `fold_in(rng, step)`.
    `axis_name`: only under `pmap`, where each device holds a slice of the batch; gradients,
    metrics and batch-norm statistics are then averaged over that axis.

    Your own loop on your own arrays (float, channels last: NHWC):

    >>> import jax, jax.numpy as jnp
    >>> from cnn_jax import get_model, optim
    >>> from cnn_jax.train import create_train_state, train_step
    >>> model = get_model("lenet5", num_classes=10)
    >>> tx = optim.make_optimizer("paper_sgd", 0.01, weight_decay=5e-4)
    >>> state = create_train_state(jax.random.key(0), model, tx, input_shape=(32, 32, 1))
    >>> step = jax.jit(train_step, donate_argnums=0)  # prep=None: the images as given
    >>> batch = {"image": jax.random.normal(jax.random.key(1), (64, 32, 32, 1)), "label": jnp.arange(64) % 10}
    >>> losses = []
    >>> for _ in range(20):
    ...     state, stats = step(state, batch, jax.random.key(2), None)
    ...     losses.append(float(stats["loss"]))
    >>> losses[-1] < losses[0] and int(state.step)
    20
    """
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    augment_key, dropout_key = jax.random.split(rng)
    if prep is not None:
        batch = {**batch, "image": prep.train(batch["image"], augment_key)}
    elif not jnp.issubdtype(batch["image"].dtype, jnp.floating):
        raise TypeError(f"train_step(prep=None) takes the network's input as floats, not {batch['image'].dtype} "
                        "images: convert and normalise them first, or pass a preprocessor "
                        "(cnn_jax.data.augment.make_preprocessor)")
    grad_fn = jax.grad(loss_and_metrics, argnums=1, has_aux=True)
    grads, (stats, updates) = grad_fn(state, state.params, batch, dropout_key, aux_weight)
    if axis_name is not None:
        grads, stats, updates = jax.lax.pmean((grads, stats, updates), axis_name)
    param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                          opt_state=opt_state, batch_stats=updates.get("batch_stats", state.batch_stats))
    stats["learning_rate"] = optim.current_learning_rate(opt_state)
    return state, stats


def eval_step(state: TrainState, batch: dict, prep=None, crops: str = "centre") -> dict:
    """Sums over the batch of loss, top-1/top-5 errors and non-finite outputs, counting only
    mask == 1 examples.

    With `prep`, uint8 images are cropped on the device ('centre' or 'ten'); without it,
    `batch['image']` is the network's input. Images of shape (B, crops, H, W, C) are several
    views of each example: their softmax outputs are averaged, as in the paper's test.
    """
    images = batch["image"] if prep is None else prep.evaluate(batch["image"], crops)
    views = images.shape[1] if images.ndim == 5 else 1
    out = state.apply_fn(_variables(state, state.params), images.reshape(-1, *images.shape[-3:]), train=False)
    logits, _ = _split_outputs(out)
    bad = metrics.count_nonfinite(logits).reshape(-1, views).max(1)
    if views > 1:
        probs = jax.nn.softmax(logits.astype(jnp.float32)).reshape(-1, views, logits.shape[-1]).mean(1)
        logits = jnp.log(probs)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    return {"loss": jnp.sum(metrics.cross_entropy(logits, batch["label"]) * mask),
            "top1_error": jnp.sum(metrics.topk_error(logits, batch["label"], 1) * mask),
            "top5_error": jnp.sum(metrics.topk_error(logits, batch["label"], 5) * mask),
            "nonfinite": jnp.sum(bad * mask), "count": jnp.sum(mask)}


def _total_steps(config, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, round(config.num_epochs * steps_per_epoch))


def step_boundaries(bounds, total_steps: int) -> tuple[int, ...]:
    """Step numbers; fractions in (0, 1) are of the run's `total_steps` (He et al.'s 0.5, 0.75)."""
    return tuple(round(b * total_steps) if isinstance(b, float) and b < 1 else int(b) for b in bounds)


def _make_optimizer(config, total_steps: int, model):
    schedule = optim.make_schedule(config.schedule, config.learning_rate, total_steps=total_steps,
                                   boundaries=step_boundaries(config.step_boundaries, total_steps),
                                   factor=config.lr_drop_factor,
                                   warmup_steps=config.warmup_steps)
    return optim.make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                weight_decay=config.weight_decay, decay=config.decay_mask,
                                **transfer.patterns(model, config))


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


@jax.jit
def all_finite(tree) -> jax.Array:
    """One device scalar: every floating-point leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _prepared(split, spec, workers: int, process: int):
    """The split's prepared store: made by process 0 while the others wait, then read by all
    (a process that cannot see it, on a disk of its own, makes its own)."""
    made = store.prepare(split, spec.store, workers=workers) if process == 0 else None
    from cnn_jax import parallel

    parallel.barrier(f"prepared:{split.split}")
    return made or store.prepare(split, spec.store, workers=workers)


def _statistics(train_store, process: int) -> dict:
    from cnn_jax import parallel

    stats = pipeline.statistics(train_store, write=process == 0) if process == 0 else None
    parallel.barrier("statistics")
    return stats or pipeline.statistics(train_store, write=False)


class Run:
    """One training run's pieces, built after every check passed; closed on every path."""

    def __init__(self, config, workdir: pathlib.Path, stack: contextlib.ExitStack):
        from cnn_jax import checks, parallel

        self.config, self.workdir = config, workdir
        self.processes, self.process = jax.process_count(), jax.process_index()
        self.mesh = parallel.make_mesh(tuple(config.mesh) or None)
        spec = pipeline.ImageSpec(config.input_size, config.resize_size, config.flip, config.channels,
                                  config.pca_noise, config.store_format)
        train_split = open_split(config.dataset, config.train_split, config.data_dir)
        eval_split = open_split(config.dataset, config.eval_split, config.data_dir)
        num_classes = checks.class_count(config, train_split.num_classes)
        if not config.classes and not config.train_per_class:
            pipeline.check_enough(len(train_split), config.batch_size)
        self.workers = config.workers or store.default_workers()
        self.train_store = _prepared(train_split, spec, self.workers, self.process)
        self.eval_store = _prepared(eval_split, spec, self.workers, self.process)
        stats = _statistics(self.train_store, self.process)  # of the whole split, subsets or not
        self.train_store = store.subset(self.train_store, tuple(config.classes), config.train_per_class)
        self.eval_store = store.subset(self.eval_store, tuple(config.classes))
        self.prep = augment.make_preprocessor(stats["mean"], stats["eigenvalues"], stats["eigenvectors"],
                                              input_size=spec.input_size, flip=spec.flip,
                                              pca_noise=spec.pca_noise)
        self.model = model = get_model(config.model_name, num_classes=num_classes, **config.model.to_dict())
        self.stream = pipeline.TrainStream(self.train_store, batch_size=config.batch_size, seed=config.seed,
                                           shard_index=self.process, shard_count=self.processes)
        self.total_steps = _total_steps(config, self.stream.steps_per_epoch)
        self.eval_every = config.eval_every_steps or self.stream.steps_per_epoch
        root_key = jax.random.key(config.seed)
        state = create_train_state(jax.random.fold_in(root_key, 0), model,
                                   _make_optimizer(config, self.total_steps, model),
                                   (config.input_size, config.input_size, config.channels))
        if config.freeze or config.head_only or config.backbone_lr_scale != 1.0:
            described = transfer.describe_training(state.params, **transfer.patterns(model, config))
            if self.process == 0:
                print(described)
        state = state.replace(apply_fn=parallel.apply_fn(model, self.mesh))
        self.runner = parallel.make_runner(config.parallel, self.mesh, model, state,
                                           functools.partial(train_step, aux_weight=config.aux_weight),
                                           eval_step, config.batch_size)
        self.state = jax.device_put(state, self.runner.state_shardings)
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
                                     f"finite checkpoint is {self.newest()}: lower {{0}} and rerun to resume "
                                     "from it", Set("learning_rate"))
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
    from cnn_jax import checks, parallel
    from cnn_jax import workdir as workdirs

    parallel.initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
    config = checks.check_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    first = jax.process_index() == 0
    workdir = workdirs.open_workdir(workdir)
    with contextlib.ExitStack() as stack:
        if first:
            stack.enter_context(workdirs.workdir_lock(workdir))
        for note in workdirs.check_resume_config(config.to_dict(), workdir, allow_change=config.allow_config_change,
                                                 write=first and not config.eval_only):
            print(f"config changed since the last run: {note}")
        run = Run(config, workdir, stack)
        return _train(run, stack)


def _train(run: Run, stack: contextlib.ExitStack) -> dict:
    config = run.config
    state, resumed = run.ckpt.restore_latest(run.state, set_aside=run.process == 0)
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
            raise CheckpointError(f"no checkpoint in {run.ckpt.directory}; train first, point --workdir at a "
                                  "run, or give weights with {0}", Set("init_from"), key="eval_only")
        host = run.runner.host_state(state)
        return {"step": step, **run.evaluate(host),
                **{f"ten_crop_{k}": v for k, v in run.evaluate(host, "ten").items()}}
    if step >= run.total_steps and resumed is not None:
        print(f"the run in {run.workdir} already finished step {run.total_steps}: evaluating it; raise "
              "num_epochs or num_train_steps to train further")
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
            if run.processes > 1 and parallel_any(stop.signum is not None):
                stopping, stop.signum = True, stop.signum or signal.SIGTERM
        if step % run.eval_every == 0 or step == run.total_steps:
            log.drain(step)
            host = run.runner.host_state(state)
            result = run.evaluate(host)
            run.writer.write(step, {f"eval/{k}": v for k, v in result.items()})
            bar.write(_eval_line(step, result))
            if step % run.eval_every == 0:  # the cadence alone drives the schedule, so a run
                # cut short and resumed equals an uninterrupted one
                state = run.runner.place_state(jax.device_put(_after_eval(host, result["top1_error"], config),
                                                              run.runner.state_shardings))
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


def parallel_any(flag: bool) -> bool:
    from cnn_jax import parallel

    return parallel.any_process(flag)


def _eval_line(step: int, result: dict) -> str:
    line = (f"step {step}: validation top-1 error {result['top1_error']:.1%}, "
            f"{evaluate.top5_text(result)}, loss {result['loss']:.3f}")
    if result.get("nonfinite"):
        line += f" ({result['nonfinite']:.0%} of outputs NaN or infinite, counted as errors)"
    return line


def _has_rgb_conv1(params) -> bool:
    kernel = params.get("conv1", {}).get("kernel") if hasattr(params, "get") else None
    return kernel is not None and kernel.shape[-2] == 3
