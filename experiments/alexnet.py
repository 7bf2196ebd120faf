"""AlexNet (Krizhevsky et al. 2012): `python -m experiments.alexnet`.

Default: the paper's network, optimiser and preprocessing on the offline digits dataset,
~2 epochs in a few minutes on 2 CPU cores. The one departure, printed at start: LeCun-normal
initialisation with zero biases, because the paper's N(0, 0.01) with biases 1 sits at
ln(10) for 125+ steps on this data. ImageNet:

    python -m experiments.alexnet --config.dataset=imagenet2012 --config.data_dir=/data/tfds \\
        --config.model.init_scheme=paper --config.num_epochs=90 --config.batch_size=128
"""

from ml_collections import config_dict

from experiments import _run


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model_name = "alexnet"
    c.model = config_dict.ConfigDict(dict(init_scheme="lecun", dropout_rate=0.5, lrn=True,
                                          pool_window=3, floor=False, dtype="float32"))
    # data
    c.dataset = "digits"
    c.data_dir = ""  # empty: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.train_split, c.eval_split = "train", "validation"
    c.input_size, c.resize_size, c.channels = 227, 256, 3
    c.flip = False  # mirrored digits are other shapes; the paper flips (ImageNet: True)
    c.workers = 0
    # optimisation: the paper's rule and constants
    c.optimizer = "paper_sgd"
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.decay_mask = "all"
    c.schedule = "plateau"
    c.lr_drop_factor = 0.1
    c.plateau_patience = 1
    c.plateau_max_drops = 3
    c.step_boundaries = ()
    c.warmup_steps = 0
    c.aux_weight = 0.3
    c.batch_size = 32
    c.num_epochs = 2.0
    c.num_train_steps = 0  # > 0 overrides num_epochs
    # evaluation, logging, checkpoints
    c.eval_batch_size = 50
    c.eval_every_steps = 0  # 0: once per epoch
    c.eval_limit = 0  # 0: the whole split
    c.log_every_steps = 10
    c.checkpoint_every_steps = 25
    c.keep_checkpoints = 2  # AlexNet state (params + momentum) is ~0.5 GB a step
    c.seed = 0
    c.smoke = False
    return c


def describe(c) -> str:
    init = c.model.init_scheme
    note = ("" if init == "paper" else
            f"\nnote: initialisation '{init}' (LeCun-normal, zero biases), not the paper's N(0, 0.01) "
            "with biases 1,\n      which stays at chance for 125+ steps on this data; "
            "--config.model.init_scheme=paper restores it.")
    return (f"AlexNet on {c.dataset}: {c.input_size}x{c.input_size} input, {c.optimizer} "
            f"(lr {c.learning_rate}, momentum {c.momentum}, weight decay {c.weight_decay}), "
            f"batch {c.batch_size}, {c.num_train_steps or f'{c.num_epochs:g} epochs'}{note}")


if __name__ == "__main__":
    _run.run(get_config, describe)
