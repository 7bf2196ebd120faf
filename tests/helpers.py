"""Small configurations and the in-process command line, shared by the tests."""

from experiments import _run
from experiments.alexnet import get_config


def tiny_config(data_dir, **overrides):
    """AlexNet on digits at 67x67 (the smallest input near 64 that its geometry allows), with
    256-unit fc6/fc7: 3.9M parameters rather than 21.6M, checkpoints of 31 MB rather than 173."""
    config = get_config()
    config.model.fc_units = 256
    config.data_dir = str(data_dir)
    config.input_size, config.resize_size = 67, 72
    config.batch_size, config.eval_batch_size = 8, 16
    config.eval_limit, config.eval_every_steps = 16, 2
    config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 4, 2, 1
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def cli_in_process(args, tmp_path, capsys):
    """(exit status, stdout, stderr) of `python -m experiments.alexnet ARGS`, in this process
    (8 simulated devices), reading data only under tmp_path/data."""
    status = _run.main(get_config, ["alexnet", *args, f"--config.data_dir={tmp_path / 'data'}"])
    out, err = capsys.readouterr()
    return status, out, err
