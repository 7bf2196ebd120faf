"""An experiment's model settings are for its own model: another `--config.model_name`
starts from that model's defaults, and a field the chosen model lacks is a one-line error
(exit status 2) before anything is read."""

import pytest

from cnn_jax import checks, get_model, summary
from experiments import _run, alexnet, googlenet, lenet, resnet


def chosen(get_config, *args):
    config, _ = _run.prepare(get_config, ["prog", *args])
    return config, checks.check_model(config)


def test_resnet50_from_the_resnet_experiment_is_the_papers(capsys):
    config, model = chosen(resnet.get_config, "--config.model_name=resnet50", "--config.input_size=224",
                           "--config.resize_size=256")
    assert model.shortcut == "B"  # the experiment's shortcut='A' is resnet20_cifar's
    # He et al. 2015 / torchvision, 1000 classes: 25,557,032 parameters (option B projections)
    imagenet = get_model(config.model_name, num_classes=1000, **config.model)
    assert summary.totals(summary.layer_table(imagenet)).params == 25_557_032
    assert "shortcut='A'" in capsys.readouterr().out  # the dropped setting is said


def test_a_variant_of_the_same_family_keeps_the_shared_settings():
    _, model = chosen(alexnet.get_config, "--config.model_name=alexnet_2tower", "--config.mesh=(4, 2)")
    assert model.init_scheme == "he"  # the experiment's departure reaches the two-tower net
    _, model = chosen(googlenet.get_config, "--config.model_name=googlenet_no_aux")
    assert model.aux_heads is False  # a variant's own defining value is never overridden


def test_the_experiments_own_model_keeps_its_settings():
    _, model = chosen(resnet.get_config)
    assert (model.shortcut, model.floor) == ("A", True)
    _, model = chosen(alexnet.get_config)
    assert model.init_scheme == "he"


def test_a_flag_on_the_command_line_applies_to_the_chosen_model():
    _, model = chosen(resnet.get_config, "--config.model_name=resnet50", "--config.model.shortcut=A")
    assert model.shortcut == "A"
    # a field the experiment does not list reaches the model with its own type
    _, model = chosen(resnet.get_config, "--config.model.residual=False")
    assert model.residual is False
    _, model = chosen(lenet.get_config, "--config.model_name=lenet5_modern", "--config.model.param_dtype=bfloat16")
    assert model.param_dtype == "bfloat16"


@pytest.mark.parametrize("args, needle", [
    (["--config.model_name=resnet50", "--config.model.init_scheme=paper"], "model 'resnet50' has no field 'init_scheme'"),
    (["--config.model.kernels=0.5"], "model 'resnet20_cifar' has no field 'kernels'"),
])
def test_a_field_the_model_lacks_is_a_one_line_error(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "nothing"))  # reading data would fail differently

    def job(config, workdir):
        raise AssertionError("the run started")

    assert _run.main(resnet.get_config, ["prog", *args], job=job) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
