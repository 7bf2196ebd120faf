"""Train state, pure train/eval steps, and `train_and_evaluate(config, workdir)`.

The steps are pure functions of (state, batch, rng): dropout keys come from
`fold_in(rng, state.step)`, not from the state, so a resumed run draws the same masks as an
uninterrupted one. Models may return logits, or a dict {'logits', 'aux_logits'} (auxiliary
heads, weighted by `aux_weight` in the loss), and may keep 'batch_stats': the step handles
all of these without model-specific branches.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from tqdm.auto import tqdm

from cnn_jax import evaluate, metrics, optim, viz
from cnn_jax.checkpoint import Checkpointer
from cnn_jax.data import pipeline
from cnn_jax.data.sources import open_split
from cnn_jax.models import get_model
from cnn_jax.writers import MetricWriter


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message gives the step."""


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


def train_step(state: TrainState, batch: dict, rng: jax.Array, aux_weight: float = 0.3,
               axis_name: str | None = None):
    """One optimiser step. Pure: jit it (`make_train_step`) with the state donated.

    `axis_name`: only under `pmap`, where each device holds a slice of the batch; gradients,
    metrics and batch-norm statistics are then averaged over that axis.
    """
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    grad_fn = jax.grad(loss_and_metrics, argnums=1, has_aux=True)
    grads, (stats, updates) = grad_fn(state, state.params, batch, rng, aux_weight)
    if axis_name is not None:
        grads, stats, updates = jax.lax.pmean((grads, stats, updates), axis_name)
    param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                          opt_state=opt_state, batch_stats=updates.get("batch_stats", state.batch_stats))
    stats["learning_rate"] = optim.current_learning_rate(opt_state)
    return state, stats


def eval_step(state: TrainState, batch: dict) -> dict:
    """Sums over the batch of loss and top-1/top-5 errors, counting only mask == 1 examples.

    Images of shape (B, crops, H, W, C) are several views of each example (ten-crop): their
    softmax outputs are averaged, as in the paper's test procedure.
    """
    images = batch["image"]
    crops = images.shape[1] if images.ndim == 5 else 1
    out = state.apply_fn(_variables(state, state.params), images.reshape(-1, *images.shape[-3:]), train=False)
    logits, _ = _split_outputs(out)
    if crops > 1:
        probs = jax.nn.softmax(logits.astype(jnp.float32)).reshape(-1, crops, logits.shape[-1]).mean(1)
        logits = jnp.log(probs)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    return {"loss": jnp.sum(metrics.cross_entropy(logits, batch["label"]) * mask),
            "top1_error": jnp.sum(metrics.topk_error(logits, batch["label"], 1) * mask),
            "top5_error": jnp.sum(metrics.topk_error(logits, batch["label"], 5) * mask),
            "count": jnp.sum(mask)}


def check_finite(loss: float, step: int):
    if not np.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss} at step {step}: lower --config.learning_rate or "
                                 "check the data; checkpoints written so far are kept")


def _total_steps(config, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, round(config.num_epochs * steps_per_epoch))


def _make_optimizer(config, total_steps: int):
    schedule = optim.make_schedule(config.schedule, config.learning_rate, total_steps=total_steps,
                                   boundaries=tuple(config.step_boundaries), factor=config.lr_drop_factor,
                                   warmup_steps=config.warmup_steps)
    return optim.make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                weight_decay=config.weight_decay, decay=config.decay_mask)


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


def overlapped_step(runner, state, data, rng):
    """One step with the next batch prepared while the device computes.

    Returns (state, stats, data_wait): the seconds the device sat idle waiting for the host
    to finish preparing the next batch (a watcher thread notes when the step's outputs are
    ready; preparation that ends before that cost nothing).
    """
    state, stats = runner.step(state, runner.place(data.pending), rng)
    ready = {}

    def watch():
        jax.block_until_ready(stats)
        ready["t"] = time.perf_counter()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        data.advance()
        prepared = time.perf_counter()
        watcher.join()
    except KeyboardInterrupt as interrupt:  # the old state was donated: hand out the new one
        raise StepInterrupted(state) from interrupt
    return state, jax.device_get(stats), max(0.0, prepared - ready["t"])


class StepInterrupted(KeyboardInterrupt):
    """Ctrl-C after a step was dispatched; `state` is the state that step produces."""

    def __init__(self, state):
        super().__init__()
        self.state = state


def _step_of(state) -> int:
    return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])  # pmap: one per device


def train_and_evaluate(config, workdir) -> dict:
    """Trains `config` in `workdir`, resuming from its newest checkpoint; returns final metrics.

    Writes workdir/checkpoints (orbax), workdir/tensorboard and workdir/metrics.jsonl.
    Ctrl-C saves a checkpoint at the current step before it stops. Runs on every device
    (`config.mesh`, `config.parallel`); with several processes each reads its own shard.
    """
    from cnn_jax import parallel

    parallel.initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
    mesh = parallel.make_mesh(tuple(config.mesh) or None)
    processes, process = jax.process_count(), jax.process_index()
    if config.batch_size % processes:
        raise ValueError(f"global batch {config.batch_size} does not divide across {processes} processes")
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = pipeline.ImageSpec(config.input_size, config.resize_size, config.flip, config.channels,
                              config.pca_noise)
    train_split = open_split(config.dataset, config.train_split, config.data_dir)
    eval_split = open_split(config.dataset, config.eval_split, config.data_dir)
    mean = pipeline.mean_image(train_split, spec)
    model = get_model(config.model_name, num_classes=train_split.num_classes, **config.model.to_dict())
    steps_per_epoch = max(1, len(train_split) // config.batch_size)
    total_steps = _total_steps(config, steps_per_epoch)
    eval_every = config.eval_every_steps or steps_per_epoch
    root_key = jax.random.key(config.seed)
    state = create_train_state(jax.random.fold_in(root_key, 0), model, _make_optimizer(config, total_steps),
                               (config.input_size, config.input_size, config.channels))
    state = state.replace(apply_fn=parallel.apply_fn(model, mesh))
    runner = parallel.make_runner(config.parallel, mesh, model, state,
                                  functools.partial(train_step, aux_weight=config.aux_weight), eval_step,
                                  config.batch_size)
    parallel.check_batch(config.eval_batch_size, mesh)
    state = jax.device_put(state, runner.state_shardings)
    data_iter = pipeline.Lookahead(iter(pipeline.train_loader(
        train_split, spec, mean, batch_size=config.batch_size // processes, seed=config.seed,
        worker_count=config.workers, shard_index=process, shard_count=processes)))
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=config.checkpoint_every_steps,
                        keep=config.keep_checkpoints)
    state, resumed = ckpt.restore_latest(state, data_iter)
    if resumed is not None:
        print(f"resumed from {ckpt.directory}/{resumed} (step {_step_of(state)} of {total_steps})")
    state = runner.place_state(state)
    writer = MetricWriter(workdir, enabled=process == 0)
    dropout_key = jax.random.fold_in(root_key, 1)

    def run_eval(host_state, crops="centre"):
        return evaluate.evaluate_split(host_state, eval_split, spec, mean, eval_fn=runner.eval,
                                       place=lambda b: parallel.place_batch(b, mesh),
                                       batch_size=config.eval_batch_size, limit=config.eval_limit,
                                       crops=crops)

    if config.eval_only:
        if resumed is None:
            raise RuntimeError(f"--config.eval_only: no checkpoint in {ckpt.directory}; train first "
                               "or point --workdir at a run")
        ckpt.close()
        writer.close()
        host = runner.host_state(state)
        return {"step": _step_of(state), **run_eval(host),
                **{f"ten_crop_{k}": v for k, v in run_eval(host, "ten").items()}}

    step, window, result = _step_of(state), [], {}
    position, step_before = data_iter.get_state(), step  # the stream and step last committed
    bar = tqdm(total=total_steps, initial=step, desc=f"{config.model_name} on {config.dataset}",
               unit="step", dynamic_ncols=True)
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            state, stats, waited = overlapped_step(runner, state, data_iter, dropout_key)
            step = _step_of(state)
            position, step_before = data_iter.get_state(), step
            check_finite(float(stats["loss"]), step)
            wait_frac = waited / (time.perf_counter() - t0)
            window.append(stats | {"data_wait": wait_frac, "seconds": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{config.batch_size / window[-1]['seconds']:.1f}",
                            wait=f"{wait_frac:.0%}", refresh=False)
            if step % config.log_every_steps == 0 or step == total_steps:
                means = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                means["images_per_second"] = config.batch_size / means.pop("seconds")
                writer.write(step, {f"train/{k}": v for k, v in means.items()})
                window = []
            if step % eval_every == 0 or step == total_steps:
                host = runner.host_state(state)
                result = run_eval(host)
                writer.write(step, {f"eval/{k}": v for k, v in result.items()})
                bar.write(f"step {step}: validation top-1 error {result['top1_error']:.1%}, "
                          f"top-5 error {result['top5_error']:.1%}, loss {result['loss']:.3f}")
                if step % eval_every == 0:  # the cadence alone drives the schedule, so a run
                    # cut short and resumed equals an uninterrupted one
                    state = runner.place_state(jax.device_put(_after_eval(host, result["top1_error"], config),
                                                              runner.state_shardings))
            if ckpt.manager.should_save(step) or step == total_steps:
                ckpt.save(step, runner.host_state(state), data_iter, force=True)
    except KeyboardInterrupt as interrupt:
        state = getattr(interrupt, "state", state)
        data_iter.set_state(position)  # back to the last committed position ...
        if _step_of(state) > step_before:  # ... past the batch of a step that ran but was not committed
            data_iter.advance()
        step = _step_of(state)
        bar.write(f"interrupted: saving step {step} to {ckpt.directory}; run the same command to resume")
        ckpt.save(step, runner.host_state(state), data_iter, force=True)
        raise
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    host = runner.host_state(state)
    if not result:  # resumed at the end: evaluate what was restored
        result = run_eval(host)
    outputs = {"checkpoints": str(ckpt.directory), "tensorboard": str(writer.tb_dir),
               "metrics_log": str(writer.jsonl_path)}
    if process == 0 and _has_rgb_conv1(host.params):
        outputs["conv1_kernels"] = str(viz.save_conv1_figure(jax.device_get(host.params), workdir / "conv1_kernels.png"))
    return {"step": step, **result, "workdir": str(workdir), **outputs}


def _has_rgb_conv1(params) -> bool:
    kernel = params.get("conv1", {}).get("kernel") if hasattr(params, "get") else None
    return kernel is not None and kernel.shape[-2] == 3
