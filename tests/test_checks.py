"""`check_config`: every check raises one line that names the flag, before any data is read;
the same value given on the command line exits 2 with that line in flag form."""

import math
import re

import pytest

from cnn_jax import checks, optim, parallel
from cnn_jax.checks import ConfigError, check_config
from experiments import alexnet, googlenet, lenet, resnet, vgg
from helpers import cli_in_process


def configured(get_config=alexnet.get_config, **overrides):
    """An experiment's config with `overrides` ('model__dtype' sets model.dtype)."""
    config = get_config()
    for key, value in overrides.items():
        holder, *path = key.split("__")
        target = config
        for part in [holder, *path][:-1]:
            target = target[part]
        target[[holder, *path][-1]] = value
    return config


def check(devices=8, processes=1, get_config=alexnet.get_config, **overrides):
    return check_config(configured(get_config, **overrides), device_count=devices, process_count=processes)


def message(devices=8, processes=1, **overrides) -> str:
    with pytest.raises(ConfigError) as err:
        check(devices, processes, **overrides)
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("get_config", [alexnet.get_config, lenet.get_config, vgg.get_config,
                                        googlenet.get_config, resnet.get_config],
                         ids=["alexnet", "lenet", "vgg", "googlenet", "resnet"])
def test_every_experiment_default_passes(get_config):
    assert check(get_config=get_config).eval_batch_size == 56


def test_returns_a_checked_copy_and_is_idempotent():
    config = configured()
    config.lock()
    once = check_config(config, device_count=8, process_count=1)
    assert config.eval_batch_size == 0 and once is not config  # the input is untouched
    assert once.eval_batch_size == 56 and once.is_locked
    twice = check_config(once, device_count=8, process_count=1)
    assert twice.to_dict() == once.to_dict()


@pytest.mark.parametrize("devices,processes,limit,expected", [
    (8, 1, 0, 56), (1, 1, 0, 50), (2, 1, 0, 50), (3, 1, 0, 51), (4, 2, 0, 52), (2, 4, 0, 52),
    (8, 1, 32, 32), (8, 1, 5, 8), (1, 1, 1000, 50)])
def test_auto_eval_batch_is_the_smallest_valid_size_near_50(devices, processes, limit, expected):
    batch = math.lcm(devices, processes)
    assert check(devices, processes, eval_limit=limit, batch_size=batch).eval_batch_size == expected


def test_auto_eval_batch_and_multiple_hint():
    assert checks.auto_eval_batch(8) == 56 and checks.auto_eval_batch(7, limit=3) == 7
    with pytest.raises(parallel.MeshError, match=r"use config.batch_size=48 or config.batch_size=56$"):
        parallel.check_batch(50, 8)
    with pytest.raises(parallel.MeshError, match=r"use config.batch_size=8$"):
        parallel.check_batch(3, 8)


@pytest.mark.parametrize("overrides,needles", [
    (dict(batch_size=0), ["config.batch_size=0: must be a positive integer"]),
    (dict(batch_size=-3), ["config.batch_size=-3: must be a positive integer"]),
    (dict(batch_size=12), ["config.batch_size=12: must be a multiple of 8", "use config.batch_size=8 or config.batch_size=16"]),
    (dict(eval_batch_size=50), ["config.eval_batch_size=50: must be a multiple of 8", "config.eval_batch_size=48 or config.eval_batch_size=56", "0 for auto"]),
    (dict(eval_batch_size=-1), ["config.eval_batch_size=-1", "0: auto"]),
    (dict(num_epochs=-1.0), ["config.num_epochs=-1.0"]),
    (dict(num_epochs=0.0), ["config.num_epochs=0.0: must be > 0", "config.num_train_steps"]),
    (dict(num_epochs=math.inf), ["config.num_epochs=inf"]),
    (dict(num_train_steps=-5), ["config.num_train_steps=-5"]),
    (dict(learning_rate=math.nan), ["config.learning_rate=nan: must be a finite number > 0"]),
    (dict(learning_rate=math.inf), ["config.learning_rate=inf"]),
    (dict(learning_rate=-1.0), ["config.learning_rate=-1.0"]),
    (dict(momentum=1.5), ["config.momentum=1.5: must be a finite number in [0, 1)"]),
    (dict(momentum=1.0), ["config.momentum=1.0"]),
    (dict(weight_decay=-1e-4), ["config.weight_decay=-0.0001"]),
    (dict(lr_drop_factor=0.0), ["config.lr_drop_factor=0.0", "(0, 1]"]),
    (dict(plateau_patience=0), ["config.plateau_patience=0"]),
    (dict(warmup_steps=-1), ["config.warmup_steps=-1"]),
    (dict(aux_weight=-0.3), ["config.aux_weight=-0.3"]),
    (dict(optimizer="adamm"), ["config.optimizer=adamm: unknown optimizer", "paper_sgd"]),
    (dict(schedule="linear"), ["config.schedule=linear: unknown schedule", "cosine"]),
    (dict(schedule="cosin"), ["did you mean cosine?"]),
    (dict(decay_mask="kernel"), ["config.decay_mask=kernel", "did you mean kernels?"]),
    (dict(step_boundaries=(20, 10)), ["config.step_boundaries=(20, 10): must be increasing"]),
    (dict(schedule="cosine", num_train_steps=100, warmup_steps=100), ["config.warmup_steps=100",
                                                                     "config.num_train_steps=100"]),
    (dict(log_every_steps=0), ["config.log_every_steps=0: must be a positive integer"]),
    (dict(checkpoint_every_steps=0), ["config.checkpoint_every_steps=0"]),
    (dict(keep_checkpoints=0), ["config.keep_checkpoints=0: must be an integer >= 1"]),
    (dict(eval_every_steps=-1), ["config.eval_every_steps=-1", "0: once per epoch"]),
    (dict(eval_limit=-1), ["config.eval_limit=-1"]),
    (dict(workers=-1), ["config.workers=-1", "0: auto"]),
    (dict(seed=-1), ["config.seed=-1"]),
    (dict(input_size=0), ["config.input_size=0: must be a positive integer"]),
    (dict(resize_size=200), ["config.resize_size=200: must be >= config.input_size=227"]),
    (dict(channels=2), ["config.channels=2", "1, 3"]),
    (dict(store_format="png"), ["config.store_format=png", "raw, jpeg"]),
    (dict(pca_noise=-0.1), ["config.pca_noise=-0.1"]),
    (dict(dataset=""), ["config.dataset=: must be a non-empty name"]),
    (dict(num_processes=0), ["config.num_processes=0: must be a positive integer"]),
    (dict(distributed_timeout=0), ["config.distributed_timeout=0: must be a positive number of seconds"]),
    (dict(process_id=1), ["config.process_id=1: must be in 0..0"]),
    (dict(parallel="xmap"), ["config.parallel=xmap: unknown parallel mode", "did you mean pmap?"]),
])
def test_each_check_names_its_flag(overrides, needles, tmp_path, capsys):
    library_and_command_line(overrides, needles, tmp_path, capsys)


def library_and_command_line(overrides, needles, tmp_path, capsys, typed=None):
    """The library's one line holds `needles`; `--config.key=value` for the same values (as
    `typed` spells them, else their str) exits 2 with one `error:` line holding them in flag
    form, and reads and writes nothing."""
    text = message(**overrides)
    for needle in needles:
        assert needle in text
    workdir = tmp_path / "run"
    typed = {key: str(value) for key, value in overrides.items()} | (typed or {})
    args = [f"--config.{key.replace('__', '.')}={value}" for key, value in typed.items()]
    status, out, err = cli_in_process([*args, f"--workdir={workdir}"], tmp_path, capsys)
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        flag = re.sub(r"(?<![-\w])config\.", "--config.", needle)
        quoted = re.sub(r"(--config\.[\w.]+)=(\(.*?\))", r"\1='\2'", flag)  # a value to paste into a shell
        assert flag in err or quoted in err, err
    assert "Traceback" not in err + out
    assert not (tmp_path / "data").exists() and not workdir.exists()  # nothing read, nothing written


def test_model_name_unknown_suggests_the_closest():
    text = message(model_name="alexnett")
    assert text.startswith("config.model_name=alexnett: unknown model; did you mean alexnet?")


def test_model_fields_of_another_family_name_the_field_and_the_fields_there_are():
    text = message(model_name="resnet20_cifar")
    assert text.startswith("config.model.dropout_rate: model 'resnet20_cifar' has no field 'dropout_rate'")
    assert "its fields are block, cifar, dtype" in text and text.endswith("remove it")
    assert check(get_config=resnet.get_config, model_name="resnet56_cifar").model_name == "resnet56_cifar"


def test_num_classes_comes_from_the_dataset():
    config = configured()
    with config.model.unlocked():
        config.model.num_classes = 5
    with pytest.raises(ConfigError, match=r"^config.model.num_classes: the class count comes from the dataset"):
        check_config(config, device_count=8, process_count=1)


@pytest.mark.parametrize("key", ["dtype", "param_dtype"])
def test_dtypes_must_be_floating_dtype_names(key):
    config = configured()
    with config.model.unlocked():
        config.model[key] = "float33"
    with pytest.raises(ConfigError, match=rf"^config.model.{key}=float33: not a floating dtype; did you mean float32"):
        check_config(config, device_count=8, process_count=1)
    config.model[key] = "int32"
    with pytest.raises(ConfigError, match=rf"config.model.{key}=int32"):
        check_config(config, device_count=8, process_count=1)
    config.model[key] = "bfloat16"
    assert check_config(config, device_count=8, process_count=1).model[key] == "bfloat16"


@pytest.mark.parametrize("mesh,typed,needles", [
    (("abc",), "abc", ["config.mesh=abc: must be () or a (data, model) pair", "config.mesh=(8, 1)"]),
    ((1,), "(1,)", ["config.mesh=(1,): must be ()"]),
    ((0, 8), "(0, 8)", ["config.mesh=(0, 8)"]),
    ((3, 2), "(3, 2)", ["config.mesh=(3, 2): needs 6 devices but 8 are available", "config.mesh=(8, 1)"]),
    ((2, 2), "(2, 2)", ["needs 4 devices but 8"]),
    ((4, 2), "(4, 2)", ["config.mesh=(4, 2): model 'alexnet' needs a 'model' axis of 1", "(8, 1)"]),
])
def test_mesh(mesh, typed, needles, tmp_path, capsys):
    library_and_command_line(dict(mesh=mesh), needles, tmp_path, capsys, typed={"mesh": typed})


def test_mesh_that_fits_sets_the_data_axis():
    assert check(8, mesh=(8, 1), batch_size=16).eval_batch_size == 56
    assert check(6, mesh=(6, 1), batch_size=12).eval_batch_size == 54


def test_two_towers_need_a_model_axis_of_two():
    assert "config.mesh=(4, 2)" in message(8, model_name="alexnet_2tower")
    assert "config.mesh=(4, 2)" in message(8, model_name="alexnet_2tower", mesh=(8, 1))
    text = message(1, model_name="alexnet_2tower", mesh=(1, 2))
    assert text.startswith("config.model_name=alexnet_2tower: needs 2 devices")
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in text
    assert check(8, model_name="alexnet_2tower", mesh=(4, 2)).eval_batch_size == 52  # data axis 4


def test_pmap_is_data_parallel_on_one_process():
    assert check(8, parallel="pmap").parallel == "pmap"
    assert "config.parallel=pmap" in message(8, parallel="pmap", model_name="alexnet_2tower", mesh=(4, 2))
    assert "config.parallel=pmap" in message(4, 2, parallel="pmap")


def test_batches_split_over_processes_too():
    text = message(4, 8, batch_size=12)
    assert "must be a multiple of 8" in text and "8 processes" in text
    assert check(4, 8, batch_size=16).eval_batch_size == 56


def test_schedule_and_optimizer_names_match_optim():
    for name in optim.SCHEDULES:
        optim.make_schedule(name, 0.1, total_steps=10, boundaries=(5,))
    with pytest.raises(ValueError):
        optim.make_schedule("linear", 0.1)
    assert all(check(optimizer=name).optimizer == name for name in optim.OPTIMIZERS)


def test_a_config_missing_keys_is_one_line():
    config = configured()
    with config.unlocked():
        del config["momentum"]
    with pytest.raises(ConfigError, match="the config lacks"):
        check_config(config, device_count=8, process_count=1)


def test_step_boundaries_as_fractions_of_the_run():
    """He et al.'s CIFAR drops at 32k and 48k of 64k iterations, as (0.5, 0.75) of any run."""
    from cnn_jax.builders import step_boundaries

    assert check(step_boundaries=(0.5, 0.75)).step_boundaries == (0.5, 0.75)
    assert step_boundaries((0.5, 0.75), 184) == (92, 138)
    assert step_boundaries((30000, 60000), 184) == (30000, 60000)  # steps stay steps
    assert message(step_boundaries=(0.5, 3)).startswith("config.step_boundaries=(0.5, 3): must be increasing")
