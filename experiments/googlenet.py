"""GoogLeNet (Szegedy et al. 2014): `python -m experiments.googlenet`.

Auxiliary heads on 4a and 4d, weighted 0.3 in the loss (`--config.aux_weight`). Offline
default at 80x80, the smallest input every window tiles (4a gives 5x5, what the auxiliary
heads' 5x5/3 pooling needs), for 8 epochs: without batch norm the network sits near chance
for its first hundred steps, and at 128x128 two epochs (about as long as 8 epochs at 80x80)
left seeds 0-4 at 32-50%. The rate is divided by 10 at three quarters of the run (printed at
start): the paper's 4% every 8 epochs is constant over 8 epochs, and the plateau rule divided
it at the first evaluation that did not improve, after 3 of the 8 epochs for seeds 2 and 3
(which ended 8.3% and 6.0%; seeds 0-4: 1.7-8.3%). The README's default runs table has the
fixed drop's results.
"""

from ml_collections import config_dict

from cnn_jax.config import defaults

from experiments import _run


def get_config() -> config_dict.ConfigDict:
    c = defaults()
    c.model_name = "googlenet"
    c.model = config_dict.ConfigDict(dict(aux_heads=True, dropout_rate=0.4, dtype="float32"))
    c.input_size, c.resize_size = 80, 90  # (128/80)^2 = 2.6x fewer pixels than 128x128
    c.learning_rate, c.decay_mask, c.weight_decay = 0.01, "kernels", 2e-4
    c.num_epochs = 8.0  # seed 1: 50% after 2 epochs at 128x128; at 80x80 7.3% after 5, 1.3% after 8
    c.batch_size = 16  # the paper gives none; without batch norm the net starts slowly, and twice
    # the updates in the same time halve its error here (58% -> 32% at seed 0, 2 epochs at 128x128)
    # The paper lowers the rate by 4% every 8 epochs, constant over a run this short; dividing it
    # by 10 once, at three quarters, is what AlexNet's and VGG's 3-epoch recipes do.
    c.schedule, c.step_boundaries = "step", (0.75,)
    return c


def describe(c) -> str:
    if c.num_train_steps == 0 and c.num_epochs <= 8:  # the paper's first 4% cut comes after epoch 8
        why, restore = "that rule is constant over 8 epochs or fewer", "--config.schedule=constant"
    else:
        why = "it is a drop of x0.96 at every 8th epoch"
        restore = "--config.lr_drop_factor=0.96 with --config.step_boundaries listing those steps"
    return _run.describe(c) + _run.fixed_drop_note(c, "by 4% every 8 epochs as in the paper", why=why, restore=restore)


if __name__ == "__main__":
    _run.run(get_config, describe)
