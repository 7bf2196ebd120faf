"""VGG (Simonyan & Zisserman 2014): `python -m experiments.vgg`.

Offline default: VGG-11 (configuration A) with batch norm on the digits at 64x64, a size
the CPU trains in minutes; `--config.model_name=vgg16 --config.input_size=224` for the paper's.
"""

from ml_collections import config_dict

from experiments import _run


def get_config() -> config_dict.ConfigDict:
    c = _run.base_config()
    c.model_name = "vgg11_bn"
    c.model = config_dict.ConfigDict(dict(dropout_rate=0.5, floor=False, dtype="float32"))
    c.input_size, c.resize_size = 64, 72
    c.learning_rate, c.decay_mask = 0.01, "kernels"
    c.num_epochs = 2.0
    return c


if __name__ == "__main__":
    _run.run(get_config)
