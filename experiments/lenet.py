"""LeNet-5 (LeCun et al. 1998): `python -m experiments.lenet`.

The paper's network (partial C3, trainable subsampling, RBF output) on the offline digits
at 32x32 grey; `--config.model_name=lenet5_modern` for ReLU/max-pool/softmax.
"""

from ml_collections import config_dict

from experiments import _run


def get_config() -> config_dict.ConfigDict:
    c = _run.base_config()
    c.model_name = "lenet5"
    c.model = config_dict.ConfigDict(dict(dtype="float32"))
    c.input_size, c.resize_size, c.channels = 32, 32, 1
    c.optimizer, c.learning_rate, c.weight_decay, c.decay_mask = "paper_sgd", 0.01, 0.0, "kernels"
    c.num_epochs = 10.0
    c.checkpoint_every_steps = 200
    return c


if __name__ == "__main__":
    _run.run(get_config)
