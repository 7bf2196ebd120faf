"""The run folder: opened up front, held by one run, resumed only with its own settings."""

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from cnn_jax import workdir as wd
from cnn_jax.workdir import WorkdirError, check_resume_config, open_workdir, record_config, workdir_lock
from experiments import alexnet
from experiments._run import FLAGS


def test_open_workdir_creates_nested_folders_and_leaves_nothing(tmp_path):
    path = open_workdir(tmp_path / "a" / "b")
    assert path == (tmp_path / "a" / "b").absolute() and path.is_dir()
    assert list(path.iterdir()) == []  # the write probe is removed
    assert open_workdir(path) == path  # an existing folder is fine


def test_a_file_is_not_a_workdir_and_stays_untouched(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(WorkdirError) as err:
        open_workdir(target)
    assert str(err.value) == f"workdir={target}: is a file, not a folder: choose another workdir"
    assert target.read_text() == "keep me"


def test_a_parent_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(WorkdirError, match=r"^workdir=.*f/run: cannot be created \(a parent is a file\): "
                                           r"choose a folder you can write to as workdir$"):
        open_workdir(tmp_path / "f" / "run")


def test_an_unwritable_workdir_is_found_by_writing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)  # root ignores permission bits
    with pytest.raises(WorkdirError, match=r"^workdir=.*: is not writable \(Permission denied\): fix its "
                                           r"permissions or choose another workdir$"):
        open_workdir(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_workdir_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WorkdirError, match="is not writable"):
            open_workdir(tmp_path)
    finally:
        tmp_path.chmod(0o700)


def test_the_lock_admits_one_holder_and_names_it(tmp_path):
    expected = (f"another run (pid {os.getpid()} on host {socket.gethostname()}) is using {tmp_path}: "
                "wait for it or choose another workdir")
    with workdir_lock(tmp_path) as path:
        assert path.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(WorkdirError) as err:  # a second open file description conflicts
            with workdir_lock(tmp_path):
                pass
        assert str(err.value) == expected
    with workdir_lock(tmp_path):  # released on exit
        pass


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    (tmp_path / ".lock").mkdir()  # as unopenable as another user's read-only file, even for root
    with pytest.raises(WorkdirError) as err:
        with workdir_lock(tmp_path):
            pass
    assert str(err.value) == (f"its lock file {tmp_path / '.lock'} cannot be opened (Is a directory): fix its "
                              "permissions, or choose another workdir")


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with workdir_lock(tmp_path):
            1 / 0
    with workdir_lock(tmp_path):
        pass


def test_the_lock_excludes_another_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom cnn_jax.workdir import workdir_lock\n"
         f"with workdir_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n    sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirError, match=rf"^another run \(pid {holder.pid} on host "):
            with workdir_lock(tmp_path):
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with workdir_lock(tmp_path):  # the holder exited
        pass


def config_dict(**overrides) -> dict:
    config = alexnet.get_config().to_dict()
    for key, value in overrides.items():
        *parents, leaf = key.split("__")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def saved(workdir) -> dict:
    return json.loads((workdir / "config.json").read_text())


def test_first_run_records_the_config_atomically(tmp_path):
    assert check_resume_config(config_dict(), tmp_path, allow_change=False) == []  # nothing recorded yet
    record_config(config_dict(), tmp_path)
    assert saved(tmp_path)["learning_rate"] == 0.01 and saved(tmp_path)["model.dtype"] == "float32"
    assert saved(tmp_path)["mesh"] == [] and "allow_config_change" not in saved(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temporary file left
    assert check_resume_config(config_dict(), tmp_path, allow_change=False) == []  # same config


def test_checking_writes_nothing(tmp_path):
    assert check_resume_config(config_dict(), tmp_path, allow_change=False) == []
    assert not (tmp_path / "config.json").exists()
    record_config(config_dict(), tmp_path)
    notes = check_resume_config(config_dict(log_every_steps=5), tmp_path, allow_change=False)
    assert notes == ["log_every_steps: 10 -> 5"] and saved(tmp_path)["log_every_steps"] == 10


def test_a_harmless_change_resumes_with_notes(tmp_path):
    record_config(config_dict(schedule="plateau"), tmp_path)
    changed = config_dict(schedule="plateau", log_every_steps=5, eval_batch_size=16, workers=4, mesh=(4, 2), num_epochs=90.0,
                          keep_checkpoints=5, smoke=True)
    notes = check_resume_config(changed, tmp_path, allow_change=False)
    assert notes == ["eval_batch_size: 0 -> 16", "keep_checkpoints: 2 -> 5", "log_every_steps: 10 -> 5",
                     "mesh: [] -> [4, 2]", f"num_epochs: {alexnet.get_config().num_epochs} -> 90.0", "smoke: false -> true", "workers: 0 -> 4"]
    record_config(changed, tmp_path)
    assert saved(tmp_path)["log_every_steps"] == 5  # the record follows the run
    assert check_resume_config(changed, tmp_path, allow_change=False) == []


def test_a_training_change_is_refused_with_each_key(tmp_path):
    record_config(config_dict(), tmp_path)
    with pytest.raises(WorkdirError) as err:
        check_resume_config(config_dict(learning_rate=0.1, log_every_steps=5), tmp_path, allow_change=False)
    assert str(err.value) == (f"workdir={tmp_path}: was trained with other settings: learning_rate: 0.01 -> 0.1: "
                              "use the saved values, another workdir, or config.allow_config_change=True")
    assert err.value.render(FLAGS) == (f"--workdir={tmp_path}: was trained with other settings: learning_rate: "
                                       "0.01 -> 0.1: use the saved values, another --workdir, or "
                                       "--config.allow_config_change=True")
    assert saved(tmp_path)["learning_rate"] == 0.01  # nothing rewritten
    with pytest.raises(WorkdirError) as err:
        check_resume_config(config_dict(batch_size=64, seed=1, model__dropout_rate=0.3, model_name="alexnet_bn",
                                        optimizer="sgdw"), tmp_path, allow_change=False)
    text = str(err.value)
    assert "\n" not in text
    assert "batch_size: 32 -> 64; model.dropout_rate: 0.5 -> 0.3; model_name: alexnet -> alexnet_bn (+2 more)" in text


def test_allow_change_goes_ahead_and_records_the_new_config(tmp_path):
    record_config(config_dict(), tmp_path)
    notes = check_resume_config(config_dict(learning_rate=0.1, log_every_steps=5), tmp_path, allow_change=True)
    assert notes == ["learning_rate: 0.01 -> 0.1", "log_every_steps: 10 -> 5"]
    record_config(config_dict(learning_rate=0.1, log_every_steps=5), tmp_path)
    assert saved(tmp_path)["learning_rate"] == 0.1
    assert check_resume_config(config_dict(learning_rate=0.1, log_every_steps=5), tmp_path, allow_change=False) == []


@pytest.mark.parametrize("schedule,boundaries,refused", [
    ("plateau", (), False), ("constant", (), False), ("step", (30000, 60000), False),
    ("step", (0.5, 0.75), True),  # fractions of the run: the drops move with its length
    ("cosine", (), True)])
def test_the_run_length_matters_only_where_it_shapes_the_schedule(tmp_path, schedule, boundaries, refused):
    record_config(config_dict(schedule=schedule, step_boundaries=boundaries), tmp_path)
    longer = config_dict(schedule=schedule, step_boundaries=boundaries, num_train_steps=500)
    if refused:
        with pytest.raises(WorkdirError, match="num_train_steps: 0 -> 500"):
            check_resume_config(longer, tmp_path, allow_change=False)
    else:
        assert check_resume_config(longer, tmp_path, allow_change=False) == ["num_train_steps: 0 -> 500"]


def test_keys_the_code_gained_or_lost_are_notes(tmp_path):
    old = config_dict()
    del old["store_format"]
    old["retired_key"] = 1
    record_config(old, tmp_path)
    assert check_resume_config(config_dict(), tmp_path, allow_change=False) == [
        "retired_key: 1 -> (absent)", "store_format: (absent) -> raw"]


def test_a_damaged_record_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WorkdirError, match=r"config.json cannot be read .*: restore it, delete it"):
        check_resume_config(config_dict(), tmp_path, allow_change=False)


def test_a_failed_write_keeps_the_old_record_and_no_temporary(tmp_path, monkeypatch):
    record_config(config_dict(), tmp_path)

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wd.os, "replace", crash)
    with pytest.raises(OSError):
        record_config(config_dict(log_every_steps=5), tmp_path)
    assert saved(tmp_path)["log_every_steps"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
