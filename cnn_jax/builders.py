"""A training run's pieces, built from a checked config in two steps: the data (splits,
prepared stores, statistics, preprocessor, stream, run length) and the state (model,
optimiser, initial state placed on the devices, runner). Each returns a small dataclass;
`train.Run` holds them with the checkpointer and the writer, and the loop uses them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import linen as nn

from cnn_jax import checks, optim, parallel, transfer
from cnn_jax.config import ConfigError, Set
from cnn_jax.data import augment, pipeline, store
from cnn_jax.data.sources import open_split
from cnn_jax.models import get_model
from cnn_jax.steps import TrainState, create_train_state, eval_step, train_step


@dataclasses.dataclass
class Data:
    """What the loop reads: prepared stores (subsets applied), the preprocessor with the
    training set's statistics, the training stream, and the run's length in steps."""

    train_store: store.Store
    eval_store: store.Store
    prep: augment.Preprocessor
    stream: pipeline.TrainStream
    num_classes: int
    workers: int
    total_steps: int
    eval_every: int


@dataclasses.dataclass
class Training:
    """The model, its initial state (canonical layout, on the devices) and the runner that
    compiles the steps over the mesh."""

    model: nn.Module
    state: TrainState
    runner: parallel.Runner


def build_data(config, process: int = 0, processes: int = 1) -> Data:
    """Opens the splits, prepares their stores (process 0 writes, the others wait), computes
    the statistics of the whole training split, applies class subsets and starts the stream."""
    spec = pipeline.ImageSpec(config.input_size, config.resize_size, config.flip, config.channels,
                              config.pca_noise, config.store_format)
    train_split = open_split(config.dataset, config.train_split, config.data_dir)
    eval_split = open_split(config.dataset, config.eval_split, config.data_dir)
    num_classes = checks.class_count(config, train_split.num_classes)
    if not config.classes and not config.train_per_class:  # before the (long) preparation
        pipeline.check_enough(len(train_split), config.batch_size)
    workers = config.workers or store.default_workers()
    train_store = _prepared(train_split, spec, workers, process)
    eval_store = _prepared(eval_split, spec, workers, process)
    stats = _statistics(train_store, process)  # of the whole split, subsets or not
    train_store = store.subset(train_store, tuple(config.classes), config.train_per_class)
    eval_store = store.subset(eval_store, tuple(config.classes))
    prep = augment.make_preprocessor(stats["mean"], stats["eigenvalues"], stats["eigenvectors"],
                                     input_size=spec.input_size, flip=spec.flip, pca_noise=spec.pca_noise,
                                     normalize=config.normalize, channel_std=stats["channel_std"])
    stream = pipeline.TrainStream(train_store, batch_size=config.batch_size, seed=config.seed,
                                  shard_index=process, shard_count=processes)
    total_steps = _total_steps(config, stream.steps_per_epoch)
    if config.schedule == "cosine" and total_steps <= config.warmup_steps:  # known only now, from the epochs
        raise ConfigError(f"the cosine schedule must warm up in fewer steps than the run's {total_steps} "
                          f"({config.num_epochs:g} epochs of {stream.steps_per_epoch} steps): lower it or lengthen "
                          "the run with {0}", Set("num_epochs"), key="warmup_steps", value=config.warmup_steps)
    return Data(train_store, eval_store, prep, stream, num_classes, workers, total_steps=total_steps,
                eval_every=config.eval_every_steps or stream.steps_per_epoch)


def build_state(config, data: Data, mesh, key: jax.Array) -> tuple[Training, str]:
    """(the model, its fresh state on the devices and the runner; a description of what is
    trained when parts are frozen or slowed, else '')."""
    model = get_model(config.model_name, num_classes=data.num_classes, **config.model.to_dict())
    state = create_train_state(key, model, _make_optimizer(config, data.total_steps, model),
                               (config.input_size, config.input_size, config.channels))
    described = ""
    if config.freeze or config.head_only or config.backbone_lr_scale != 1.0:
        described = transfer.describe_training(state.params, **transfer.patterns(model, config))
    state = state.replace(apply_fn=parallel.apply_fn(model, mesh))
    runner = parallel.make_runner(config.parallel, mesh, model, state,
                                  functools.partial(train_step, aux_weight=config.aux_weight),
                                  eval_step, config.batch_size)
    return Training(model, jax.device_put(state, runner.state_shardings), runner), described


def _total_steps(config, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, round(config.num_epochs * steps_per_epoch))


def step_boundaries(bounds, total_steps: int) -> tuple[int, ...]:
    """Step numbers; fractions in (0, 1) are of the run's `total_steps` (He et al.'s 0.5, 0.75)."""
    return tuple(round(b * total_steps) if optim.is_fraction(b) else int(b) for b in bounds)


def _make_optimizer(config, total_steps: int, model):
    schedule = optim.make_schedule(config.schedule, config.learning_rate, total_steps=total_steps,
                                   boundaries=step_boundaries(config.step_boundaries, total_steps),
                                   factor=config.lr_drop_factor,
                                   warmup_steps=config.warmup_steps)
    return optim.make_optimizer(config.optimizer, schedule, momentum=config.momentum,
                                weight_decay=config.weight_decay, decay=config.decay_mask,
                                **transfer.patterns(model, config))


def _prepared(split, spec, workers: int, process: int):
    """The split's prepared store: made by process 0 while the others wait, then read by all
    (a process that cannot see it, on a disk of its own, makes its own)."""
    made = store.prepare(split, spec.store, workers=workers) if process == 0 else None
    parallel.barrier(f"prepared:{split.split}")
    return made or store.prepare(split, spec.store, workers=workers)


def _statistics(train_store, process: int) -> dict:
    stats = pipeline.statistics(train_store, write=process == 0) if process == 0 else None
    parallel.barrier("statistics")
    return stats or pipeline.statistics(train_store, write=False)
