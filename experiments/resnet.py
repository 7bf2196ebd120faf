"""ResNet (He et al. 2015): `python -m experiments.resnet`.

Offline default: the paper's CIFAR network ResNet-20 (option A shortcuts) on the digits at
32x32, 0.1 learning rate divided by 10 at half and three quarters of training, weight decay
1e-4 on kernels; `--config.model_name=resnet50
--config.input_size=224` for the ImageNet family (its own option B shortcuts: this experiment's
model settings are for resnet20_cifar only).
"""

from ml_collections import config_dict

from cnn_jax.config import defaults

from experiments import _run


def get_config() -> config_dict.ConfigDict:
    c = defaults()
    c.model_name = "resnet20_cifar"
    c.model = config_dict.ConfigDict(dict(shortcut="A", floor=True, dtype="float32"))
    c.input_size, c.resize_size = 32, 36
    c.learning_rate, c.weight_decay, c.decay_mask = 0.1, 1e-4, "kernels"
    c.num_epochs = 4.0
    # He et al.'s CIFAR schedule: 0.1, divided by 10 at 50% and 75% of training (32k and 48k
    # of 64k iterations), as fractions of whatever the run's length is.
    c.schedule, c.step_boundaries = "step", (0.5, 0.75)
    return c


if __name__ == "__main__":
    _run.run(get_config)
