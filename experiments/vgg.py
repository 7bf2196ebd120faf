"""VGG (Simonyan & Zisserman 2014): `python -m experiments.vgg`.

Offline default: VGG-11 (configuration A) with batch norm on the digits at 64x64, a size
the CPU trains in minutes; `--config.model_name=vgg16 --config.input_size=224` for the paper's.
The rate is divided by 10 at 3/4 of the run (printed at start), not when the validation
accuracy stops improving as in the paper: 3 epochs reach no plateau.
"""

from ml_collections import config_dict

from cnn_jax.config import defaults

from experiments import _run


def get_config() -> config_dict.ConfigDict:
    c = defaults()
    c.model_name = "vgg11_bn"
    c.model = config_dict.ConfigDict(dict(dropout_rate=0.5, floor=False, dtype="float32"))
    c.input_size, c.resize_size = 64, 72
    c.learning_rate, c.decay_mask = 0.01, "kernels"
    c.num_epochs = 3.0  # 2 epochs left 1.3-6.7% over seeds 0-4; a third took seeds 0 and 4 from 6.7% to 2.0 and 1.7%
    # Simonyan & Zisserman divide the rate by 10 when validation accuracy stops improving; a
    # 3-epoch run divides it once, at three quarters.
    c.schedule, c.step_boundaries = "step", (0.75,)
    return c


def describe(c) -> str:
    return _run.describe(c) + _run.fixed_drop_note(c, "when the validation accuracy stops improving")


if __name__ == "__main__":
    _run.run(get_config, describe)
