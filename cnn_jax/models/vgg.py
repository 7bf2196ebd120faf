"""VGG (Simonyan & Zisserman, 2014): configurations A, B, D, E = VGG-11, -13, -16, -19.

3x3 convolutions (stride 1, padding 1), 2x2 max pooling, fc 4096-4096-classes with dropout
0.5 after fc6 and fc7; optional batch norm after every convolution (`vgg16_bn` ...).
Layers are named `conv{block}_{i}` as in the paper's Caffe release. Initialisation as in
common re-implementations (the paper initialised deep nets from net A): He-normal (fan-out)
convolutions, N(0, 0.01) fully connected layers, zero biases.
"""

from __future__ import annotations

import functools

import flax.linen as nn

from cnn_jax.layers import BatchNorm, Conv, MaxPool, checks_geometry, wide
from cnn_jax.models import ModelSpec, TorchLayout, register
from cnn_jax.models.precision import Precision

# Convolutions per block (each block ends in a 2x2 max pool); widths 64, 128, 256, 512, 512.
CONFIGS = {"A": (1, 1, 2, 2, 2), "B": (2, 2, 2, 2, 2), "D": (2, 2, 3, 3, 3), "E": (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


def torchvision_layout(model) -> TorchLayout:
    """torchvision's `features` count conv, [bn], relu per convolution and a pool per block."""
    names, i = {}, 0
    for block, convs in enumerate(CONFIGS[model.config], start=1):
        for j in range(1, convs + 1):
            names[f"conv{block}_{j}"] = f"features.{i}"
            names[f"bn{block}_{j}"] = f"features.{i + 1}"
            i += 3 if model.batch_norm else 2
        i += 1
    names.update(fc6="classifier.0", fc7="classifier.3", fc8="classifier.6")
    return TorchLayout(lambda path: names[path[0]], chw={("fc6",): 512})


class VGG(Precision):
    """VGG; `config` is one of 'A', 'B', 'D', 'E'. Returns float32 logits."""

    input_shape = (224, 224, 3)
    spec = ModelSpec(head=("fc8",), torchvision=torchvision_layout)

    config: str = "D"
    num_classes: int = 1000
    batch_norm: bool = False
    dropout_rate: float = 0.5
    floor: bool = False

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.config not in CONFIGS:
            raise ValueError(f"unknown VGG configuration {self.config!r}; choose one of {sorted(CONFIGS)}")
        kw = self.precision
        conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        x = x.astype(self.dtype)
        for block, (convs, width) in enumerate(zip(CONFIGS[self.config], WIDTHS), start=1):
            for i in range(1, convs + 1):
                x = Conv(width, (3, 3), padding=1, kernel_init=conv_init, floor=self.floor,
                         name=f"conv{block}_{i}", **kw)(x)
                if self.batch_norm:
                    x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                     name=f"bn{block}_{i}", **kw)(x)
                x = nn.relu(x)
            x = MaxPool(2, 2, floor=self.floor, name=f"pool{block}")(x)
        x = x.reshape(x.shape[0], -1)
        dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.01), **kw)
        for name in ("fc6", "fc7"):
            x = nn.relu(dense(4096, name=name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{name[-1]}")(x)
        return wide(dense(self.num_classes, name="fc8")(x))


for _depth, _config in (("11", "A"), ("13", "B"), ("16", "D"), ("19", "E")):
    register(f"vgg{_depth}")(functools.partial(VGG, config=_config))
    register(f"vgg{_depth}_bn")(functools.partial(VGG, config=_config, batch_norm=True))
