"""The whole config checked before any data is read or any array is built.

A typo should cost a second, not a dataset load and a compile: `check_config` raises a
`ConfigError` that names the key, its value and the fix in one line, and returns a copy with
the derived values filled in (`eval_batch_size=0`: auto). It is idempotent, so both the
command line and `train_and_evaluate` may call it. The rules themselves belong to the modules
that use the values (`optim.SCHEDULES`, `parallel.check_mesh`, ...), and a plain value's range
to `config.RULES` beside its default; this module composes them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import ml_collections

from cnn_jax import optim, parallel
from cnn_jax.config import ConfigError, Set, check_plain, is_int, one_of, suggest
from cnn_jax.data import augment, store
from cnn_jax.models import abstract_variables, spec_of

DTYPES = ("float32", "bfloat16", "float16", "float64")
EVAL_BATCH_TARGET = 50  # the auto eval batch: the smallest valid size at least this large
SHOWN = 3  # items listed in full in a message; the rest are counted


# ---- small helpers ----------------------------------------------------------------------

def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _fail(key: str, value, why: str, *settings: Set):
    raise ConfigError(why, *settings, key=key, value=value)


def _listing(names, limit: int = 20) -> str:
    names = list(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def choice(config, key: str, choices, what: str):
    one_of(key, _get(config, key), choices, what)


def auto_eval_batch(step: int, limit: int = 0, target: int = EVAL_BATCH_TARGET) -> int:
    """The smallest multiple of `step` that is >= target (or >= limit when that is smaller:
    a batch larger than the evaluated examples is padding)."""
    want = min(target, limit) if limit > 0 else target
    return max(1, math.ceil(want / step)) * step


# ---- families of checks ------------------------------------------------------------------

def check_model(config):
    """model_name, the model's fields and its dtypes; returns the constructed module
    (construction is cheap: flax builds nothing until `init`)."""
    from cnn_jax.models import get_model, list_models

    name, fields = config.model_name, _get(config, "model")
    fields = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
    names = list_models()
    if name not in names:
        _fail("model_name", name, f"unknown model; {suggest(name, names)}choose one of {_listing(names, 50)}")
    if "num_classes" in fields:
        raise ConfigError("the class count comes from the dataset ({0}); remove num_classes from the "
                          "model's config", Set("dataset"), key="model.num_classes")
    accepted = sorted(f.name for f in dataclasses.fields(get_model(name, num_classes=10))
                      if f.name not in ("parent", "name", "num_classes"))
    unknown = sorted(set(fields) - set(accepted))
    if unknown:
        raise ConfigError(f"model {name!r} has no field {unknown[0]!r}"
                          f"{f' (nor {_listing(unknown[1:], SHOWN)})' if unknown[1:] else ''}; "
                          f"its fields are {', '.join(accepted)}: remove it", key=f"model.{unknown[0]}")
    for key in ("dtype", "param_dtype"):
        if key in fields:
            check_dtype(f"model.{key}", fields[key])
    try:
        return get_model(name, num_classes=10, **fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0], key="model_name", value=name) from None


def check_geometry(config, model):
    """The input size tiles every window layer of `model`, before any data is read (a shape-only
    trace of its initialisation, remembered per model and input)."""
    from cnn_jax.layers import GeometryError

    try:
        abstract_variables(model, config.input_size, config.channels)
    except GeometryError as err:
        fixes = [Set("input_size", err.suggestion)] if err.suggestion else []
        if any(f.name == "floor" for f in dataclasses.fields(model)):
            fixes.append(Set("model.floor", True))
        said = [f"{{{i}}}" + (" to round every layer's output down" if f.key == "model.floor" else "")
                for i, f in enumerate(fixes)]
        raise ConfigError(f"does not fit {config.model_name}: {err.problem} Set "
                          f"{' or '.join(said) or 'another input size'}", *fixes,
                          key="input_size", value=config.input_size) from None


def check_dtype(key: str, value):
    """A floating dtype name (or dtype); 'float33' fails here, not inside the first step."""
    import jax.numpy as jnp

    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        _fail(key, value, f"not a floating dtype; {suggest(value, DTYPES)}use one of {', '.join(DTYPES)}")


def check_optimisation(config):
    choice(config, "optimizer", sorted(optim.OPTIMIZERS), "optimizer")
    choice(config, "schedule", optim.SCHEDULES, "schedule")
    try:
        optim.decay_mask(config.decay_mask)
    except ValueError:
        choice(config, "decay_mask", ("all", "kernels"), "weight-decay mask")
    bounds = tuple(config.step_boundaries)
    fractions = all(optim.is_fraction(b) for b in bounds)
    if not (fractions or all(is_int(b) and b > 0 for b in bounds)) or list(bounds) != sorted(set(bounds)):
        _fail("step_boundaries", bounds, "must be increasing positive step numbers, e.g. {0}, or "
                                         "fractions of the run in (0, 1), e.g. {1}",
              Set("step_boundaries", (30000, 60000)), Set("step_boundaries", (0.5, 0.75)))
    if config.schedule == "cosine" and 0 < config.num_train_steps <= config.warmup_steps:
        _fail("warmup_steps", config.warmup_steps, "the cosine schedule must warm up in fewer than {0} steps",
              Set("num_train_steps", config.num_train_steps))


def check_length(config):
    """num_train_steps wins when > 0; otherwise num_epochs must be positive."""
    if config.num_train_steps == 0 and config.num_epochs <= 0:
        _fail("num_epochs", config.num_epochs, "must be > 0, or set {0} to a positive number of steps",
              Set("num_train_steps"))


def check_data(config):
    """How images are resized, normalised and stored."""
    if config.resize_size < config.input_size:
        _fail("resize_size", config.resize_size, "must be >= {0} (crops are cut from the resized image)",
              Set("input_size", config.input_size))
    augment.check_normalize(config.normalize, config.channels)
    choice(config, "store_format", store.FORMATS, "store format")


def check_transfer(config, model):
    """Class subsets, the weights to start from (a weights file needs a model with a
    torchvision layout), and what to freeze."""
    classes = tuple(config.classes)
    if classes and (not all(is_int(c) and c >= 0 for c in classes) or len(set(classes)) != len(classes)
                    or len(classes) < 2):
        _fail("classes", classes, "must be two or more distinct class numbers, e.g. {0}",
              Set("classes", (5, 6, 7, 8, 9)))
    if config.init_from and not os.path.exists(config.init_from):
        _fail("init_from", config.init_from, "no such file or folder: give a .pth, .pt or .safetensors file, or a "
                                             "run's workdir")
    check_start(config, model)
    try:
        re.compile(config.freeze)
    except re.error as err:
        _fail("freeze", config.freeze, f"not a regular expression ({err}); e.g. {{0}}", Set("freeze", "^conv"))
    if config.head_only and config.backbone_lr_scale != 1.0:
        _fail("backbone_lr_scale", config.backbone_lr_scale, "has no effect with {0} (the backbone is "
                                                             "frozen): drop one of the two", Set("head_only", True))
    if config.freeze or config.head_only or config.backbone_lr_scale != 1.0:
        check_freezing(config, model)


def check_start(config, model):
    """What `config.init_from` names can start this model: a run with a checkpoint, or a
    weights file for a model with a torchvision layout (and PyTorch to read a .pth)."""
    import importlib.util

    from cnn_jax import transfer, weights

    source = config.init_from
    if not source:
        return
    if os.path.isdir(source):
        try:
            transfer.checkpoint_of(source)
        except transfer.TransferError as err:
            raise ConfigError(err.text, *err.settings, key=err.key, value=err.value) from None
        return
    try:
        weights.layout(model)
    except weights.WeightsError as err:
        _fail("init_from", source, err.text, *err.settings)
    if not source.endswith(".safetensors") and importlib.util.find_spec("torch") is None:
        _fail("init_from", source, "reading a PyTorch file needs PyTorch: pip install 'cnn_jax[torch]', or "
                                   "convert it to .safetensors")


def check_freezing(config, model):
    """The freeze and backbone patterns against the model's parameter paths (shapes only)."""
    from cnn_jax import transfer

    try:
        params = abstract_variables(model, config.input_size, config.channels)["params"]
        transfer.describe_training(params, **transfer.patterns(model, config))
    except transfer.TransferError as err:
        raise ConfigError(str(err), key="freeze" if config.freeze else "head_only") from None
    except ValueError:  # the input size does not fit the model: check_geometry's error says so
        pass


def class_count(config, available: int) -> int:
    """The model's class count: the dataset's `available`, or the length of `config.classes`
    (checked against `available` once the dataset is open)."""
    wrong = [c for c in config.classes if c >= available]
    if wrong:
        _fail("classes", tuple(config.classes), f"{config.dataset} has classes 0..{available - 1}, not "
                                                f"{', '.join(map(str, wrong))}")
    return len(config.classes) or available


def check_processes(config):
    """The multi-process settings, checked before `jax.distributed` is started with them (after
    `check_plain`, which has checked num_processes and distributed_timeout)."""
    choice(config, "distributed", parallel.DISTRIBUTED, "process launch")
    if not is_int(config.process_id) or not 0 <= config.process_id < config.num_processes:
        _fail("process_id", config.process_id, f"must be in 0..{config.num_processes - 1} ({{0}})",
              Set("num_processes", config.num_processes))


def check_batches(config, data_axis: int, process_count: int) -> int:
    """batch_size and eval_batch_size split evenly over the data axis and the processes;
    returns the eval batch size (0 in the config: auto)."""
    parallel.check_batch(config.batch_size, data_axis, process_count)
    if config.eval_batch_size == 0:
        return auto_eval_batch(math.lcm(data_axis, process_count), config.eval_limit)
    parallel.check_batch(config.eval_batch_size, data_axis, process_count, key="eval_batch_size",
                         also=", or 0 for auto")
    return config.eval_batch_size


def check_config(config, *, device_count: int, process_count: int) -> ml_collections.ConfigDict:
    """Every check: the plain values' rules first, then the rest in the order a user reads the
    flags. Returns a checked copy with `eval_batch_size` filled in; raises `ConfigError` (one
    line) on the first problem."""
    try:
        check_plain(config)
        check_processes(config)
        model = check_model(config)
        check_data(config)
        check_geometry(config, model)
        check_transfer(config, model)
        check_optimisation(config)
        check_length(config)
        data_axis = parallel.check_mesh(config.mesh, spec_of(model).towers, device_count, config.parallel,
                                        process_count, config.model_name)
        eval_batch = check_batches(config, data_axis, process_count)
    except (AttributeError, KeyError) as err:  # a config without a key these checks read
        raise ConfigError(f"the config lacks {str(err).splitlines()[0]}: start from "
                          "cnn_jax.config.defaults() or an experiment's get_config()") from None
    checked = ml_collections.ConfigDict(config.to_dict())
    checked.eval_batch_size = eval_batch
    if getattr(config, "is_locked", False):
        checked.lock()
    return checked
