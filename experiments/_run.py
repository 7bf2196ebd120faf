"""Shared entry point: `python -m experiments.<name> [--workdir=DIR] [--config.key=value ...]`.

Each experiment module defines `get_config()` and calls `run(get_config)`; the flags
`--config.x=...` override declared keys only (the config is locked: a typo is an error).
The whole config is checked before any data is read. Exit status: 0 done, 2 a user error
(one line on stderr: the flag and the fix), 1 a failed run (one line) or a bug (its
traceback), 128 + N stopped by signal N after saving (130: Ctrl-C, 143: SIGTERM).
"""

from __future__ import annotations

import difflib
import json
import logging as std_logging
import os
import sys

import jax
import jax.numpy as jnp
from absl import flags, logging
from ml_collections import config_dict, config_flags

import cnn_jax
from cnn_jax import checks, evaluate, optim, parallel
from cnn_jax.checkpoint import CheckpointError, newest_step
from cnn_jax.config import Advice, ConfigError, Notation, SettingError, check_plain
from cnn_jax.models import list_models, model_defaults, variant_fields
from cnn_jax.train import NonFiniteLossError, RunStopped, train_and_evaluate

FLAGS = Notation(config="--config.", argument="--", shell=True)  # config.<key> is --config.<key> here


def describe(c) -> str:
    return (f"{c.model_name} on {c.dataset}: {c.input_size}x{c.input_size}x{c.channels} input, {c.optimizer} "
            f"(lr {c.learning_rate}, momentum {c.momentum}, weight decay {c.weight_decay}, schedule "
            f"{_schedule(c)}), batch {c.batch_size}, {c.num_train_steps or f'{c.num_epochs:g} epochs'}")


def _schedule(c) -> str:
    """'step: x0.1 at 75%' for a step schedule (fractions as percentages of the run), else its
    name; either followed by its warm-up."""
    name = c.schedule
    if c.schedule == "step":
        at = ", ".join(f"{b:.0%}" if optim.is_fraction(b) else f"step {b:g}" for b in c.step_boundaries)
        name = f"step: x{c.lr_drop_factor:g} at {at}"
    return name + (f" after {c.warmup_steps} warm-up steps" if c.warmup_steps else "")


def fixed_drop_note(c, paper: str, why: str = "a run of a few epochs has no plateau to detect",
                    restore: str = "--config.schedule=plateau") -> str:
    """The note for a short run's drop at a fixed point where the paper drops otherwise
    (by default: on a plateau of the validation error)."""
    if c.schedule != "step":
        return ""
    return (f"\nnote: the learning rate drops at fixed points of the run, not {paper}:\n"
            f"      {why}; {restore} restores the paper's rule.")


def smoke(config: config_dict.ConfigDict, given=frozenset()) -> config_dict.ConfigDict:
    """A seconds-long version of `config` for tests and quick checks: few steps, small eval.
    Keys in `given` (set on the command line) keep the user's values."""
    values = {"num_train_steps": 3, "batch_size": min(config.batch_size, 8),
              "eval_limit": 32, "eval_every_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 3}
    with config.unlocked():
        for key, value in values.items():
            if key not in given:
                setattr(config, key, value)
    return config


def _items(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, config_dict.ConfigDict):
            yield from _items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _given_key(arg: str) -> str | None:
    """'batch_size' for --config.batch_size=8, --config.batch_size (value next) or --noconfig.flip."""
    for prefix in ("--config.", "--noconfig."):
        if arg.startswith(prefix):
            return arg.removeprefix(prefix).split("=")[0]
    return None


def check_keys(argv, known):
    """Every --config.key names a declared key (ml_collections would fail with a multi-line
    error while defining the flag)."""
    for key in filter(None, map(_given_key, argv[1:])):
        if key == "model.num_classes":
            raise ConfigError("--config.model.num_classes: the class count comes from the dataset "
                              "(--config.dataset), not from a flag")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean --config.{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key --config.{key}{hint} (keys: {', '.join(sorted(known))})")


def _flag_value(argv, key: str) -> str | None:
    """The value of --config.<key> on the command line (the last one wins), or None."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--config.{key}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--config.{key}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def declare_model_fields(config, argv):
    """Declares, with the model's defaults, the fields of the chosen model that the command
    line sets and the experiment does not list, so that --config.model.<field> reaches any
    field of any model; a field the model lacks is a one-line error naming its fields."""
    name = _flag_value(argv, "model_name") or config.model_name
    if name not in list_models():
        return config  # check_model names the unknown model
    defaults = model_defaults(name)
    for key in filter(None, map(_given_key, argv[1:])):
        field = key.removeprefix("model.")
        if key == field or field in config.model or field == "num_classes":
            continue
        if field not in defaults:
            raise ConfigError(f"--config.model.{field}: model {name!r} has no field {field!r}; "
                              f"its fields are {', '.join(sorted(defaults))}")
        default = defaults[field]
        if default is None:
            raise ConfigError(f"--config.model.{field}: its default is None, which a flag cannot type; "
                              f"set it in Python: get_model({name!r}, {field}=...)")
        with config.unlocked():
            config.model[field] = jnp.dtype(default).name if "dtype" in field else default
    return config


def parse_flags(get_config, argv) -> tuple[config_dict.ConfigDict, str | None, set[str]]:
    """(the config with the flags applied, --workdir, the config keys the command line set),
    parsed into a fresh FlagValues so that `main` can run more than once in a process."""
    config = declare_model_fields(get_config(), argv)
    check_keys(argv, [key for key, _ in _items(config)])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, lock_config=True, flag_values=fv, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "output folder; a run there resumes (default runs/<model>_<dataset>)",
                        flag_values=fv)
    fv.append_flag_values(flags.FLAGS)  # absl's and the libraries' own flags (--verbosity, ...)
    try:
        rest = fv(list(argv))
    except flags.Error as err:
        raise ConfigError(_flag_error(str(err))) from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected argument(s) {' '.join(rest[1:])}: set values with "
                          "--config.key=value and the output folder with --workdir=DIR")
    flags.FLAGS.mark_as_parsed()  # libraries read the global flags (parsed above, in fv)
    return fv.config, fv.workdir, set(config_flags.get_override_values(fv["config"]))


def _flag_error(message: str) -> str:
    """absl's parse error in one line, with the accepted spellings of a boolean."""
    line = message.splitlines()[0].removeprefix("flag ")
    flag, _, why = line.partition(": ")
    if "Non-boolean argument" in why:
        return f"{flag}: not a boolean; write True or False (or 1, 0)"
    return line


def own_model_fields(config, written_for: str, given) -> tuple[config_dict.ConfigDict, dict]:
    """(config, the fields dropped): an experiment's model fields are written for its own model
    (`written_for`). Another `--config.model_name` keeps the ones its family shares (the
    field exists there, and neither model's variant sets it: AlexNet's init_scheme reaches
    the two-tower net), and the `--config.model.<field>` values of the command line; the
    rest are its own defaults. Otherwise experiments.resnet's shortcut='A', which makes
    resnet20_cifar the paper's CIFAR net, would give resnet50 zero-padding shortcuts."""
    if config.model_name == written_for or config.model_name not in list_models():
        return config, {}  # an unknown name is check_model's error
    fields = model_defaults(config.model_name)
    variants = variant_fields(written_for).keys() | variant_fields(config.model_name).keys()
    kept = {k: v for k, v in config.model.items()
            if f"model.{k}" in given or (k in fields and k not in variants)}
    dropped = {k: v for k, v in config.model.items() if k not in kept and _differs(k, v, fields.get(k))}
    with config.unlocked():
        config.model = config_dict.ConfigDict(kept)
    config.lock()
    return config, dropped


def _differs(field: str, value, default) -> bool:
    """Whether `value` is not the model's `default` (dtypes compared as dtypes)."""
    if "dtype" in field and default is not None:
        return jnp.dtype(value) != jnp.dtype(default)
    return value != default


def prepare(get_config, argv, name: str = "") -> tuple[config_dict.ConfigDict, str]:
    """(config, workdir) from the command line, checked before anything is read or written.

    One process: the whole config is checked here. Several: `train_and_evaluate` checks it
    once `jax.distributed` is up (the device count is global only then), still before any
    data is read.
    """
    config, workdir, given = parse_flags(get_config, argv)
    written_for = get_config().model_name
    config, dropped = own_model_fields(config, written_for, given)
    if dropped:
        shown = ", ".join(f"{k}={v!r}" for k, v in dropped.items())
        print(f"note: this experiment's model settings ({shown}) are for {written_for}; "
              f"{config.model_name} keeps its own defaults (set a field with --config.model.<field>=...)")
    if config.smoke:
        config = smoke(config, given)
    check_plain(config)  # before the launch, which reads num_processes and distributed_timeout
    checks.check_processes(config)
    how, _, _ = parallel.launch(config.distributed, config.num_processes, config.coordinator_address)
    if how == "single":
        config = checks.check_config(config, device_count=jax.device_count(), process_count=1)
    default = f"runs/{name or f'{config.model_name}_{config.dataset}'}" + ("_smoke" if config.smoke else "")
    return config, workdir or default  # a smoke run never lands in (and blocks) the real run's folder


def usage(get_config) -> str:
    doc = sys.modules[get_config.__module__].__doc__ or ""
    keys = "\n".join(f"  --config.{key}={value!r}" for key, value in _items(get_config()))
    return f"{doc.strip()}\n\nflags:\n  --workdir=DIR (default runs/<model>_<dataset>)\n{keys}"


def report(config, result: dict):
    print(f"\n{'evaluated' if config.eval_only else 'finished at'} step {result['step']}: validation "
          f"top-1 error {result['top1_error']:.1%}, {evaluate.top5_text(result)} "
          f"(loss {result['loss']:.3f})")
    if "ten_crop_top1_error" in result:
        print(f"ten-crop (softmax averaged over 10 patches): top-1 error {result['ten_crop_top1_error']:.1%}, "
              f"{evaluate.top5_text(result, 'ten_crop_')}")
    for key in ("checkpoints", "tensorboard", "metrics_log", "curves", "conv1_kernels"):
        if key in result:
            print(f"  {key:<13} {result[key]}")
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}))


def _error(err: BaseException, status: int) -> int:
    """One line on stderr, in flags: the library's errors name `config.<key>`; here `--config.<key>`."""
    text = err.render(FLAGS) if isinstance(err, Advice) else str(err)
    message = " ".join(text.split("\n")) or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return status


def _resume_note(workdir, job):
    """After a stop that did not save: where the same command goes on from (one run's workdir)."""
    if workdir is None or job is not None:
        return
    try:
        newest = newest_step(workdir)
        print(f"the same command resumes from {newest} (step {newest.name})", file=sys.stderr)
    except (FileNotFoundError, OSError):
        print(f"no checkpoint in {workdir} yet: the same command starts over", file=sys.stderr)


def main(get_config, argv, describe=describe, job=None, show=report, name: str = "") -> int:
    """Runs the experiment for `argv` (argv[0]: the program) and returns the exit status.

    `job(config, workdir) -> result` is the work (default: one `train_and_evaluate`) and
    `show(config, result)` prints it; the default workdir is runs/<name>, or
    runs/<model>_<dataset> for a single run. Callable in-process (tests): each call parses into
    fresh flags. A setting to change prints one line `error: ...` in flags and returns 2; a run
    that cannot go on (NaN, a failed save) one line and 1; a run stopped by a signal returns
    128 + its number. Anything else is a bug: it propagates with its traceback.
    """
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)  # before parsing: --verbosity overrides it
    if any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
        print(usage(get_config))
        return 0
    workdir = None
    try:
        config, workdir = prepare(get_config, argv, name)
        print(describe(config))
        result = (job or train_and_evaluate)(config, workdir)
    except SettingError as err:  # a setting to change: config, workdir, dataset, store, weights, mesh
        return _error(err, 2)
    except NonFiniteLossError as err:  # names the newest finite checkpoint itself
        return _error(err, 1)
    except RunStopped as stop:  # saved already, and said so; the status says which signal
        return 128 + stop.signum
    except KeyboardInterrupt:
        _resume_note(workdir, job)
        return 130
    except CheckpointError as err:  # a run that cannot go on: a failed save, eval_only with no checkpoint
        status = _error(err, 1)
        _resume_note(workdir, job)
        return status
    except Exception:  # a bug: its traceback is the report (exit status 1)
        _resume_note(workdir, job)
        raise
    show(config, result)
    return 0


def _quiet_closed_loop(hook):
    """sys.unraisablehook without "Event loop is closed": after a failed checkpoint write (a
    full disk), tensorstore's writes still in flight call back into orbax's closed event loop
    and report that once each; the one-line error already says what happened."""

    def unraisablehook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            hook(unraisable)

    return unraisablehook


def _no_orbax_thread_tracebacks(record) -> bool:
    """Keeps orbax's errors to their one-line message: its background write threads log the
    traceback of a failed save, whose failure also reaches the run as a CheckpointError and
    is reported in one line."""
    if record.exc_info and "orbax" in record.pathname:
        record.exc_info = record.exc_text = None
    return True


OWN_CODE = tuple(os.path.dirname(os.path.abspath(module.__file__)) + os.sep for module in (cnn_jax, sys.modules[__name__]))


def _own_or_severe(record) -> bool:
    """The console shows this project's messages and every error; the libraries' warnings
    (tensorflow-datasets' "Variant folder ... has no dataset_info.json", ...) go only to the
    run's warnings.log, as they ask nothing of the user."""
    return record.levelno >= std_logging.ERROR or os.path.abspath(record.pathname).startswith(OWN_CODE)


def run(get_config, describe=describe, job=None, show=report, name: str = ""):
    """`python -m experiments.<name>`: `main` on the command line, its status the exit code."""
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    logging.get_absl_handler().addFilter(_no_orbax_thread_tracebacks)
    logging.get_absl_handler().addFilter(_own_or_severe)
    std_logging.captureWarnings(True)  # Python warnings (jax's, flax's) take the same way: to warnings.log
    sys.exit(main(get_config, sys.argv, describe, job, show, name))
