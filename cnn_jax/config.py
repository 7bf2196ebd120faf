"""The settings of a training run: every key `train_and_evaluate` reads, its default, and the
error a setting raises.

The library speaks Python. A `SettingError` names the offending key and value as they are
written on the config object (`config.batch_size=30: must be a multiple of 4 ...: use
config.batch_size=28 or config.batch_size=32`); the command line renders the same error in
its own notation through `render(notation)`.
A plain value's rule (a range, a yes/no, a short fixed list) sits in `RULES` beside its
default; a rule that needs the model, the data or the devices belongs to the module that uses
the value, and `checks.check_config` composes them all before any data is read.

    config = cnn_jax.config.defaults()     # AlexNet on the offline digits, the paper's rule
    config.batch_size = 128
    cnn_jax.train.train_and_evaluate(config, "runs/mine")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re

from ml_collections import config_dict

NO_VALUE = object()  # a Set without a value names the key alone


@dataclasses.dataclass(frozen=True)
class Notation:
    """How settings are written: a config key after `config`, a run's own argument (the
    workdir) after `argument`, values quoted as one shell word where `shell`."""

    config: str = "config."
    argument: str = ""
    shell: bool = False


PYTHON = Notation()  # config.batch_size=32, workdir=runs/x: what a library user writes


@dataclasses.dataclass(frozen=True)
class Set:
    """A config key (or, with `argument`, an argument of the run such as its workdir),
    optionally with a value: `config.mesh=(4, 2)` in Python's notation."""

    key: str
    value: object = NO_VALUE
    argument: bool = False

    def render(self, notation: Notation = PYTHON, quote: bool = True) -> str:
        name = (notation.argument if self.argument else notation.config) + self.key
        if self.value is NO_VALUE:
            return name
        text = show(self.value)
        if quote and notation.shell and any(c in text for c in " ()[]'\"<>|;&*"):
            text = "'" + text.replace("'", "'\\''") + "'"  # one shell word
        return f"{name}={text}"


def show(value) -> str:
    """A value as written in a config: tuples in parentheses, strings bare."""
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


WORKDIR = Set("workdir", argument=True)  # the run's folder: train_and_evaluate's argument, --workdir


def literal(value) -> str:
    """`value` (a path, a pattern, a config line) as text inside an `Advice`: its braces are
    shown as they are, never read as a setting's `{N}`."""
    return str(value).replace("{", "{{").replace("}", "}}")


class Advice:
    """An error that names settings: `text` may name them as `{0}`, `{1}`, ... (given as `Set`s
    after it; a user's value goes in through `literal`); `key` (a config key, or a `Set`) and `value`, when given, lead the message.
    `str()` is one line in Python's notation; `render(notation)` the same line in another (the
    command line's flags). Mixed into exceptions."""

    def __init__(self, text: str, *settings: Set, key: str | Set = "", value=NO_VALUE):
        self.text, self.settings, self.key, self.value = text, settings, key, value
        super().__init__(self.render())

    def render(self, notation: Notation = PYTHON) -> str:
        lead = self.key if isinstance(self.key, Set) else Set(self.key, self.value)
        head = f"{lead.render(notation, quote=False)}: " if self.key else ""  # the value as given
        named = [s.render(notation) for s in self.settings]

        def fill(match):  # {N}: the N-th setting; {{ and }}: a brace of a `literal` value
            if match.group(1) is None:
                return match.group(0)[0]
            index = int(match.group(1))
            return named[index] if index < len(named) else match.group(0)

        return head + re.sub(r"\{\{|\}\}|\{(\d+)\}", fill, self.text)

    def __reduce__(self):  # picklable across processes despite the keyword arguments
        return _rebuild, (type(self), self.text, self.settings, self.key, self.value)


def _rebuild(cls, text, settings, key, value):
    return cls(text, *settings, key=key, value=value)


class SettingError(Advice, ValueError):
    """A setting (or a combination) that cannot run."""


class ConfigError(SettingError):
    """A config value that cannot run, found before any data is read."""


def suggest(value, choices) -> str:
    """'did you mean X? ' for the choice closest to a mistyped `value`, else ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f"did you mean {close[0]}? " if close else ""


def one_of(key: str, value, choices, what: str, error: type[ConfigError] = ConfigError):
    """`value` of `key` is one of `choices`; otherwise a one-line `error` suggesting the closest."""
    if value not in choices:
        raise error(f"unknown {what}; {suggest(value, choices)}choose one of {', '.join(map(str, choices))}",
                    key=key, value=value)


# What a resumed run may change. How a run is watched, stored or placed may change freely; the
# length matters only where the schedule is laid out over it; the rest (a new key too, and
# every model field) changes what is trained and is refused unless allow_config_change.
WATCHING = frozenset({"checkpoint_every_steps", "coordinator_address", "data_dir", "eval_batch_size",
                      "eval_every_steps", "eval_limit", "eval_split", "init_from", "keep_checkpoints",
                      "log_every_steps", "mesh", "new_head", "num_processes", "parallel", "process_id", "smoke",
                      "workers", "distributed", "distributed_timeout", "compilation_cache"})
LENGTH = frozenset({"num_epochs", "num_train_steps"})
NOT_RECORDED = frozenset({"allow_config_change", "eval_only"})  # how to resume or look, not what was trained
OWN_BLOCKS = ("experiment.",)  # an experiment's own settings: its runs' keys say what each trains


def defaults() -> config_dict.ConfigDict:
    """Every key a run reads, with its default; experiments override values. An experiment of
    many runs keeps its own settings under one key of its own (`experiment`)."""
    c = config_dict.ConfigDict()
    c.model_name = "alexnet"  # any name of cnn_jax.list_models()
    c.model = config_dict.ConfigDict(dict(dtype="float32"))  # the model's fields; set per experiment
    # data
    c.dataset = "digits"
    c.data_dir = ""  # empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.train_split, c.eval_split = "train", "validation"
    c.input_size, c.resize_size, c.channels = 227, 256, 3
    c.normalize = "mean_image"  # the paper's; 'channel' (the training set's), 'imagenet' (torchvision's weights)
    c.store_format = "raw"  # prepared images: 'raw' uint8 pixels, or 'jpeg' (smaller on disk, lossy)
    c.flip = False  # mirrored digits are other shapes; the paper flips (ImageNet: True)
    c.pca_noise = 0.1  # the paper's colour augmentation: alpha_i ~ N(0, 0.1); 0 turns it off
    c.workers = 0  # read-ahead threads; 0: auto (one per core)
    c.classes = ()  # keep only these classes of the dataset, relabelled 0..k-1 in this order; (): all
    c.train_per_class = 0  # at most this many training images of each class (0: all)
    # transfer: start from trained weights, freeze, replace the head
    c.init_from = ""  # a PyTorch-format weights file (.pth, .pt, .safetensors) or another run's workdir
    c.freeze = ""  # regular expression over parameter paths (e.g. '^conv'): no update, no decay
    c.head_only = False  # train only the model's head (its last layer), freeze the rest
    c.new_head = False  # with init_from: a fresh head even when the class count matches (other classes)
    c.backbone_lr_scale = 1.0  # the rate of everything but the head, as a multiple of the head's
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
    c.step_boundaries = ()  # steps, or fractions of the run in (0, 1)
    c.warmup_steps = 0
    c.aux_weight = 0.3
    c.batch_size = 32
    c.num_epochs = 2.0
    c.num_train_steps = 0  # > 0 overrides num_epochs
    # evaluation, logging, checkpoints
    c.eval_batch_size = 0  # 0: auto, the smallest multiple of the 'data' axis (and processes) >= 50
    c.eval_every_steps = 0  # 0: once per epoch
    c.eval_limit = 0  # 0: the whole split
    c.eval_only = False  # evaluate the newest checkpoint (centre and ten-crop) and stop
    c.log_every_steps = 10
    c.checkpoint_every_steps = 25
    c.keep_checkpoints = 2  # an AlexNet state (params + momentum) is ~0.5 GB
    c.seed = 0
    c.smoke = False
    c.allow_config_change = False  # resume a workdir with settings that change what is trained
    # devices
    c.parallel = "jit"  # or "pmap" (data parallel only)
    c.mesh = ()  # (data, model); empty: all devices on 'data'. Two towers: (N, 2)
    c.coordinator_address = ""  # multi-host: HOST:PORT of process 0 (or $JAX_COORDINATOR_ADDRESS)
    # compiled programs kept across runs (a resumed or repeated run skips compiling); '' turns it off
    c.compilation_cache = os.environ.get("CNN_JAX_COMPILATION_CACHE", "~/.cache/cnn_jax/xla")
    c.distributed = "detect"  # 'auto' under srun/mpirun (detected), else the three settings here; or force one
    c.distributed_timeout = 300  # seconds a process waits for the others to join
    c.num_processes = 1
    c.process_id = 0
    return c


# ---- what a plain value must be ------------------------------------------------------------
# A key whose rule needs nothing but its own value (a range, a yes/no, a short fixed list that
# no other code reads) has the rule here, beside its default; `check_plain` applies them all.
# Rules that depend on the model, the data or the devices belong to the module that uses the
# value, and `checks.check_config` composes those.

def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class AtLeast:
    """An integer >= low; `what` replaces the default wording."""

    low: int
    what: str = ""

    def __call__(self, key: str, value):
        if not is_int(value) or value < self.low:
            raise ConfigError(self.what or ("must be a positive integer" if self.low == 1 else
                                            f"must be an integer >= {self.low}"), key=key, value=value)


@dataclasses.dataclass(frozen=True)
class Within:
    """A finite number in [low, high) (ends open or closed as given); NaN and infinities never."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __call__(self, key: str, value):
        if not (is_number(value) and math.isfinite(value) and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high)):
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            span = (f"> {self.low:g}" if self.high == math.inf and self.low_open else f">= {self.low:g}"
                    if self.high == math.inf else f"in {left}{self.low:g}, {self.high:g}{right}")
            raise ConfigError(f"must be a finite number {span}", key=key, value=value)


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values; `what` names the set in the message."""

    choices: tuple
    what: str

    def __call__(self, key: str, value):
        one_of(key, value, self.choices, self.what)


def yes_no(key: str, value):
    if not isinstance(value, bool):
        raise ConfigError("must be True or False", key=key, value=value)


def non_empty(key: str, value):
    if not isinstance(value, str) or not value:
        raise ConfigError("must be a non-empty name", key=key, value=value)


POSITIVE, NON_NEGATIVE = Within(0.0, low_open=True), Within(0.0)
RULES = {
    "dataset": non_empty, "train_split": non_empty, "eval_split": non_empty,
    "input_size": AtLeast(1), "resize_size": AtLeast(1),
    "channels": OneOf((1, 3), "channel count (1: grey, 3: RGB)"),
    "flip": yes_no, "pca_noise": NON_NEGATIVE,
    "workers": AtLeast(0, "must be an integer >= 0 (0: auto, one per core)"),
    "train_per_class": AtLeast(0, "must be an integer >= 0 (0: every image)"),
    "head_only": yes_no, "new_head": yes_no, "backbone_lr_scale": POSITIVE,
    "learning_rate": POSITIVE, "momentum": Within(0.0, 1.0), "weight_decay": NON_NEGATIVE,
    "lr_drop_factor": Within(0.0, 1.0, low_open=True, high_open=False),
    "plateau_patience": AtLeast(1), "plateau_max_drops": AtLeast(0), "warmup_steps": AtLeast(0),
    "aux_weight": NON_NEGATIVE, "seed": AtLeast(0),
    "batch_size": AtLeast(1), "num_train_steps": AtLeast(0), "num_epochs": NON_NEGATIVE,
    "eval_batch_size": AtLeast(0, "must be an integer >= 0 (0: auto)"),
    "eval_every_steps": AtLeast(0, "must be an integer >= 0 (0: once per epoch)"),
    "eval_limit": AtLeast(0, "must be an integer >= 0 (0: the whole split)"),
    "eval_only": yes_no, "log_every_steps": AtLeast(1), "checkpoint_every_steps": AtLeast(1),
    "keep_checkpoints": AtLeast(1, "must be an integer >= 1 (checkpoints kept)"),
    "smoke": yes_no, "allow_config_change": yes_no,
    "distributed_timeout": AtLeast(1, "must be a positive number of seconds"), "num_processes": AtLeast(1),
}


def check_plain(config):
    """Every key of `RULES` against its rule, in the table's order (about that of `defaults()`)."""
    for key, rule in RULES.items():
        rule(key, config[key])
