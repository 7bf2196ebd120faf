"""Shared entry point: `python -m experiments.<name> [--workdir=DIR] [--config.key=value ...]`.

Each experiment module defines `get_config()` and calls `run(get_config)`; the flags
`--config.x=...` override declared keys only (the config is locked: a typo is an error).
"""

from __future__ import annotations

import difflib
import json
import sys

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from cnn_jax.data.sources import DatasetError
from cnn_jax.train import NonFiniteLossError, train_and_evaluate


def base_config() -> config_dict.ConfigDict:
    """Every key an experiment may set; experiments override values, never add keys."""
    c = config_dict.ConfigDict()
    c.model_name = "alexnet"  # any name of cnn_jax.list_models()
    c.model = config_dict.ConfigDict(dict(dtype="float32"))  # the model's fields; set per experiment
    # data
    c.dataset = "digits"
    c.data_dir = ""  # empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.train_split, c.eval_split = "train", "validation"
    c.input_size, c.resize_size, c.channels = 227, 256, 3
    c.flip = False  # mirrored digits are other shapes; the paper flips (ImageNet: True)
    c.pca_noise = 0.1  # the paper's colour augmentation: alpha_i ~ N(0, 0.1); 0 turns it off
    c.workers = 0
    # optimisation: the paper's rule and constants
    c.optimizer = "paper_sgd"
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.decay_mask = "all"
    c.schedule = "plateau"
    c.lr_drop_factor = 0.1
    c.plateau_patience = 1
    c.plateau_max_drops = 3
    c.step_boundaries = ()
    c.warmup_steps = 0
    c.aux_weight = 0.3
    c.batch_size = 32
    c.num_epochs = 2.0
    c.num_train_steps = 0  # > 0 overrides num_epochs
    # evaluation, logging, checkpoints
    c.eval_batch_size = 50
    c.eval_every_steps = 0  # 0: once per epoch
    c.eval_limit = 0  # 0: the whole split
    c.eval_only = False  # evaluate the newest checkpoint (centre and ten-crop) and stop
    c.log_every_steps = 10
    c.checkpoint_every_steps = 25
    c.keep_checkpoints = 2  # an AlexNet state (params + momentum) is ~0.5 GB
    c.seed = 0
    c.smoke = False
    # devices
    c.parallel = "jit"  # or "pmap" (data parallel only)
    c.mesh = ()  # (data, model); empty: all devices on 'data'. Two towers: (N, 2)
    c.coordinator_address = ""  # multi-host: HOST:PORT of process 0 (or $JAX_COORDINATOR_ADDRESS)
    c.num_processes = 1
    c.process_id = 0
    return c


def describe(c) -> str:
    return (f"{c.model_name} on {c.dataset}: {c.input_size}x{c.input_size}x{c.channels} input, {c.optimizer} "
            f"(lr {c.learning_rate}, momentum {c.momentum}, weight decay {c.weight_decay}, schedule {c.schedule}), "
            f"batch {c.batch_size}, {c.num_train_steps or f'{c.num_epochs:g} epochs'}")


def smoke(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """A seconds-long version of `config` for tests and quick checks: few steps, small eval."""
    with config.unlocked():
        config.num_train_steps = config.num_train_steps or 3
        config.batch_size = min(config.batch_size, 8)
        config.eval_batch_size = min(config.eval_batch_size, 16)
        config.eval_limit = 32
        config.eval_every_steps = 3
        config.log_every_steps = 1
        config.checkpoint_every_steps = 3
    return config


def _main(argv, describe):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config.key=value")
    config = flags.FLAGS.config
    if config.smoke:
        config = smoke(config)
    workdir = flags.FLAGS.workdir or f"runs/{config.model_name}_{config.dataset}"
    print(describe(config))
    try:
        result = train_and_evaluate(config, workdir)
    except (DatasetError, NonFiniteLossError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"\n{'evaluated' if config.eval_only else 'finished at'} step {result['step']}: validation "
          f"top-1 error {result['top1_error']:.1%}, top-5 error {result['top5_error']:.1%} "
          f"(loss {result['loss']:.3f})")
    if "ten_crop_top1_error" in result:
        print(f"ten-crop (softmax averaged over 10 patches): top-1 error {result['ten_crop_top1_error']:.1%}, "
              f"top-5 error {result['ten_crop_top5_error']:.1%}")
    for key in ("checkpoints", "tensorboard", "metrics_log", "conv1_kernels"):
        if key in result:
            print(f"  {key:<13} {result[key]}")
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))
    return 0


def _keys(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, config_dict.ConfigDict):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _unknown_key_error(argv, known) -> str | None:
    """A one-line error for the first --config.key that the config does not declare."""
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg.split("=")[0].removeprefix("--config.")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean --config.{close[0]}?" if close else ""
            return f"error: unknown config key --config.{key}{hint} (keys: {', '.join(sorted(known))})"
    return None


def _parse_flags(argv):
    """absl parsing, with an ill-typed value as one line rather than a usage dump."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def run(get_config, describe=describe):
    """Defines the flags and runs training under absl."""
    config = get_config()
    message = _unknown_key_error(sys.argv, list(_keys(config)))
    if message:  # ml_collections would raise a multi-line AttributeError while defining the flag
        print(message, file=sys.stderr)
        sys.exit(2)
    config_flags.DEFINE_config_dict("config", config, lock_config=True)
    flags.DEFINE_string("workdir", None, "output folder; a run there resumes (default runs/<model>_<dataset>)")
    logging.set_verbosity(logging.WARNING)
    app.run(lambda argv: sys.exit(_main(argv, describe)), flags_parser=_parse_flags)
