"""Bad command lines: status 2 and one line `error: ...` naming the flag, before any data is
read and before anything is written (the CLI, called in-process on 8 simulated devices). The
values each library check refuses are in test_checks.py, which runs each also as a flag; here:
what only the command line can get wrong (parsing, unknown keys) and the checks that need a
model or several keys together."""

import signal

import pytest

from cnn_jax.checkpoint import CheckpointError
from cnn_jax.config import ConfigError, Set
from cnn_jax.data.sources import DatasetError
from cnn_jax.train import NonFiniteLossError, RunStopped
from experiments import _run, alexnet
from helpers import cli_in_process

CASES = [  # (arguments, what the one line must contain)
    (["--config.num_epochs=0", "--config.num_train_steps=0"], "--config.num_train_steps"),
    (["--config.model_name=alexnett"], "did you mean alexnet?"),
    (["--config.model_name=resnet20_cifar", "--config.model.dropout_rate=0.5"], "--config.model.dropout_rate"),
    (["--config.model.dtype=float33"], "--config.model.dtype=float33"),
    (["--config.model.num_classes=5"], "--config.model.num_classes: the class count comes from the dataset"),
    (["--config.parallel=pmap", "--config.mesh=(4, 2)"], "--config.mesh=(4, 2)"),
    (["--config.model_name=alexnet_2tower"], "--config.mesh='(4, 2)'"),
    (["--config.input_size=224"], "54.25, not a whole number. Set --config.input_size=227 or --config.model.floor=True"),
    (["--config.model_name=googlenet", "--config.input_size=100"], "Set --config.input_size="),
    (["--config.flip=yes"], "--config.flip=yes: not a boolean; write True or False"),
    (["--config.num_processes=2"], "--config.coordinator_address"),
    (["--config.batch_sise=4"], "unknown config key --config.batch_sise; did you mean --config.batch_size?"),
    (["--noconfig.flipp"], "did you mean --config.flip?"),
    (["--config.batch_size=abc"], "--config.batch_size=abc"),
    (["--config.smoke=maybe"], "--config.smoke"),
    (["--config.batch_size"], "--config.batch_size"),
    (["train"], "unexpected argument(s) train: set values with --config.key=value"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(args) for args, _ in CASES])
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, needle):
    workdir = tmp_path / "run"
    status, out, err = cli_in_process([*args, f"--workdir={workdir}"], tmp_path, capsys)
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "data").exists() and not workdir.exists()  # nothing read, nothing written


def test_a_file_as_workdir_is_refused_and_untouched(tmp_path, capsys):
    target = tmp_path / "results.csv"
    target.write_text("a,b\n1,2\n")
    status, _, err = cli_in_process(["--config.smoke=True", f"--workdir={target}"], tmp_path, capsys)
    assert status == 2 and err == f"error: --workdir={target}: is a file, not a folder: choose another --workdir\n"
    assert target.read_text() == "a,b\n1,2\n" and not (tmp_path / "data").exists()


def test_a_valid_command_line_is_checked_with_auto_eval_batch_and_smoke_keeps_given_keys(tmp_path):
    config, workdir = _run.prepare(alexnet.get_config, ["alexnet", "--config.smoke=True",
                                                        "--config.log_every_steps=5", "--config.batch_size=16"])
    assert workdir == "runs/alexnet_digits_smoke"  # never the real run's folder
    assert (config.log_every_steps, config.batch_size) == (5, 16)  # given: kept
    assert (config.eval_every_steps, config.checkpoint_every_steps, config.num_train_steps) == (3, 3, 3)
    assert config.eval_batch_size == 32  # auto: a multiple of 8 covering eval_limit=32
    config, _ = _run.prepare(alexnet.get_config, ["alexnet", "--config.eval_batch_size=0"])
    assert config.eval_batch_size == 56 and config.batch_size == 32


@pytest.mark.parametrize("raised,status,line", [
    (RunStopped(signal.SIGTERM), 143, ""),
    (RunStopped(signal.SIGINT), 130, ""),
    (KeyboardInterrupt(), 130, "{resume}"),
    (NonFiniteLossError("loss is nan at step 3"), 1, "error: loss is nan at step 3\n"),
    (DatasetError("unknown dataset 'x': use digits"), 2, "error: unknown dataset 'x': use digits\n"),
    (CheckpointError("no checkpoint\nin runs/x: give {0}", Set("init_from"), key="eval_only"), 1,
     "error: --config.eval_only: no checkpoint in runs/x: give --config.init_from\n{resume}"),
    (ConfigError("use {0}", Set("mesh", (2, 1)), key="mesh", value=(3, 1)), 2,
     "error: --config.mesh=(3, 1): use --config.mesh='(2, 1)'\n"),
], ids=["sigterm", "sigint", "keyboard", "nonfinite", "dataset", "checkpoint", "config"])
@pytest.mark.parametrize("saved", [None, 50])
def test_exit_statuses_of_a_run(tmp_path, capsys, monkeypatch, raised, status, line, saved):
    """Every way out says where the same command goes on from: the stop's own save, the
    newest finite checkpoint, or here the newest checkpoint on disk (or none)."""
    workdir = tmp_path / "run"
    if saved is not None:
        (workdir / "checkpoints" / "25" / "state").mkdir(parents=True)
        (workdir / "checkpoints" / str(saved) / "state").mkdir(parents=True)

    def train(config, workdir):
        raise raised

    monkeypatch.setattr(_run, "train_and_evaluate", train)
    got, _, err = cli_in_process([f"--workdir={workdir}"], tmp_path, capsys)
    resume = (f"the same command resumes from {workdir}/checkpoints/{saved} (step {saved})\n" if saved
              else f"no checkpoint in {workdir} yet: the same command starts over\n")
    assert (got, err) == (status, line.format(resume=resume))


def test_a_bug_keeps_its_traceback_and_says_where_to_resume(tmp_path, capsys, monkeypatch):
    def train(config, workdir):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(_run, "train_and_evaluate", train)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        _run.main(alexnet.get_config, ["alexnet", f"--workdir={tmp_path}"])
    assert "the same command starts over" in capsys.readouterr().err


def test_help_lists_the_flags(tmp_path, capsys):
    assert _run.main(alexnet.get_config, ["alexnet", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config.batch_size=32" in out and "--workdir" in out and "AlexNet" in out


def test_several_processes_leave_the_device_checks_to_train_and_evaluate():
    import jax

    config, _ = _run.prepare(alexnet.get_config, ["alexnet", "--config.num_processes=2", "--config.process_id=1",
                                                  "--config.coordinator_address=127.0.0.1:1"])
    assert config.eval_batch_size == 0  # checked once jax.distributed knows every process's devices
    assert not jax.distributed.is_initialized()


# The library: what a researcher's own code may pass. Each is one line naming the fix.
def _alexnet67():
    import jax
    import jax.numpy as jnp

    from cnn_jax import get_model

    model = get_model("alexnet", num_classes=3)
    return model, model.init(jax.random.key(0), jnp.zeros((1, 67, 67, 3)), train=False)


def _prep():
    import numpy as np

    from cnn_jax.data import augment

    return augment.make_preprocessor(np.zeros((72, 72, 3)), np.zeros(3), np.eye(3), input_size=67, flip=True,
                                     pca_noise=0.1)


def _apply(images):
    model, variables = _alexnet67()
    return model.apply(variables, images, train=False)


def _library_cases():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnn_jax import get_model, layers
    from cnn_jax.data import augment

    key = jax.random.key(0)
    return [  # (id, call, error class, what the one line must contain)
        ("apply rank 3", lambda: _apply(jnp.zeros((67, 67, 3))), layers.InputError, "add the batch axis"),
        ("apply uint8", lambda: _apply(jnp.zeros((2, 67, 67, 3), jnp.uint8)), layers.InputError,
         "takes float images (mean-subtracted pixels), got uint8"),
        ("apply int32", lambda: _apply(jnp.zeros((2, 67, 67, 3), jnp.int32)), layers.InputError, "got int32"),
        ("apply 1 channel", lambda: _apply(jnp.zeros((2, 67, 67, 1))), layers.InputError,
         "got images with 1 channel(s) but its parameters take 3 (/conv1/kernel)"),
        ("apply 99x99 to 67x67 parameters", lambda: _apply(jnp.zeros((2, 99, 99, 3))), layers.InputError,
         "parameter /fc6/kernel has shape (256, 4096) but these images of shape (2, 99, 99, 3) need (1024, 4096)"),
        ("apply 64x64", lambda: _apply(jnp.zeros((2, 64, 64, 3))), layers.GeometryError,
         "Nearest input size that fits the whole model: 67"),
        ("apply channels-first", lambda: _apply(jnp.zeros((2, 3, 67, 67))), layers.InputError,
         "looks channels-first (NCHW): pass images.transpose(0, 2, 3, 1)"),
        ("init 5-d", lambda: get_model("vgg11", num_classes=3).init(key, jnp.zeros((1, 2, 32, 32, 3)), train=False),
         layers.InputError, "got shape (1, 2, 32, 32, 3)"),
        ("prep float", lambda: _prep().train(jnp.zeros((2, 72, 72, 3)), key), layers.InputError,
         "takes uint8 pixels (0..255), got float32"),
        ("prep size", lambda: _prep().evaluate(jnp.zeros((2, 67, 67, 3), jnp.uint8)), layers.InputError,
         "shape (batch, 72, 72, 3), got (2, 67, 67, 3)"),
        ("prep rank", lambda: _prep().train(jnp.zeros((72, 72, 3), jnp.uint8), key), layers.InputError,
         "got (72, 72, 3)"),
        ("unknown model", lambda: get_model("alexnett"), ValueError, "Did you mean 'alexnet'?"),
        ("unknown field", lambda: get_model("alexnet", num_clases=3), ValueError, "no field(s) ['num_clases']"),
        ("make_preprocessor", lambda: augment.make_preprocessor(np.zeros((32, 32, 3)), np.zeros(3), np.eye(3),
                                                                input_size=67, flip=True, pca_noise=0.0),
         ValueError, "raise config.resize_size"),
    ]


LIBRARY = _library_cases()


@pytest.mark.parametrize("case", LIBRARY, ids=[c[0] for c in LIBRARY])
def test_library_bad_input_is_one_line(case):
    _, call, error, needle = case
    with pytest.raises(error) as info:
        call()
    assert "\n" not in str(info.value) and needle in str(info.value), str(info.value)


def _photos(root, layout):
    """root/<split>/<class>/i.jpg of real photos, `layout` {split: {class: count}}."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((120, 80))
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo.save(root / split / cls / f"{i}.jpg")


@pytest.mark.parametrize("layout,needle", [
    ({"train": {"a": 3, "b": 3}, "val": {"a": 1, "b": 1}},
     "the training split has 6 images, fewer than one batch of 8: lower --config.batch_size or add images"),
    ({"train": {"a": 2, "b": 0}, "val": {"a": 1, "b": 1}}, "train/b has no readable images"),
    ({"train": {"a": 2}, "val": {"a": 1}}, "1 class folder(s)"),
], ids=["tiny", "empty class", "one class"])
def test_tiny_and_empty_datasets_are_one_line_and_keep_the_workdir(tmp_path, capsys, layout, needle):
    _photos(tmp_path / "photos", layout)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    status, out, err = cli_in_process([f"--config.dataset=folder:{tmp_path / 'photos'}", "--config.batch_size=8",
                                 "--config.smoke=True", f"--workdir={workdir}"], tmp_path, capsys)
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err + out and (workdir / "notes.txt").read_text() == "mine"


def test_library_warnings_go_to_the_run_log_and_stay_off_the_console(tmp_path):
    import logging

    from cnn_jax.writers import warnings_log

    def record(path, level=logging.WARNING):
        return logging.LogRecord("absl", level, path, 1, "Variant folder x has no dataset_info.json", None, None)

    import os

    import cnn_jax

    # a checkout named cnn_jax with its .venv inside: the library is still the library
    library = record("/home/me/cnn_jax/.venv/lib/site-packages/tensorflow_datasets/core/utils/file_utils.py")
    assert not _run._own_or_severe(library)  # off the console
    assert _run._own_or_severe(record(os.path.join(os.path.dirname(cnn_jax.__file__), "train.py")))
    assert _run._own_or_severe(record("/venv/site-packages/orbax/checkpoint/x.py", logging.ERROR))
    with warnings_log(tmp_path) as path:
        logging.getLogger("absl").warning("Variant folder x has no dataset_info.json")
        logging.getLogger("absl").info("not kept")
    logging.getLogger("absl").warning("after the run")
    text = (tmp_path / "warnings.log").read_text()
    assert path.endswith("warnings.log") and "dataset_info.json" in text and "not kept" not in text
    assert "after the run" not in text


@pytest.mark.parametrize("message", [
    # flax 0.11.2 and later
    'For parameter "{p}" in "{w}", the given initializer is expected to generate shape {new}, but the existing '
    'parameter it received has shape {old}.',
    # flax 0.11.1 and earlier, which swap the two shapes
    'Initializer expected to generate shape {old} but got shape {new} instead for parameter "{p}" in "{w}".'],
    ids=["flax>=0.11.2", "flax<0.11.2"])
def test_flax_shape_errors_are_read_in_either_wording(message):
    """Both wordings of flax's ScopeParamShapeError give the same one line: the channels when
    they are the difference, the shapes otherwise."""
    from cnn_jax.input_checks import _parameter_mismatch

    read = lambda p, w, old, new, images: str(_parameter_mismatch(  # noqa: E731
        "AlexNet", images, message.format(p=p, w=w, old=old, new=new)))
    assert read("kernel", "/conv1", (11, 11, 3, 96), (11, 11, 1, 96), (2, 227, 227, 1)) == (
        "AlexNet got images with 1 channel(s) but its parameters take 3 (/conv1/kernel): give it 3-channel "
        "images, or parameters made for these")
    assert read("kernel", "/fc6", (256, 4096), (1024, 4096), (2, 99, 99, 3)).startswith(
        "AlexNet: parameter /fc6/kernel has shape (256, 4096) but these images of shape (2, 99, 99, 3) need "
        "(1024, 4096):")
    assert read("my-scale.0", "/bn", (), (64,), (2, 32, 32, 3)).startswith(  # any name; a scalar
        "AlexNet: parameter /bn/my-scale.0 has shape () but these images of shape (2, 32, 32, 3) need (64,):")
