"""The four-layer CIFAR-10 network of Krizhevsky, Sutskever & Hinton (2012), sections 3.1 and 3.3.

Their Figure 1 (ReLU against tanh: 25% training error six times sooner) and their CIFAR-10
LRN result (13% -> 11% test error) use "a four-layer convolutional network": three 5x5
convolutions of 32, 32 and 64 kernels, each followed by pooling, then one fully connected
layer, as in cuda-convnet's CIFAR-10 configuration. LRN (the paper's constants) follows the
first two activations, as in AlexNet. `hidden` adds fully connected layers before the output,
each with dropout on its input as AlexNet's fc6 and fc7 have.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax.layers import Conv, LocalResponseNorm, MaxPool, checks_geometry, wide
from cnn_jax.models import ModelSpec, register
from cnn_jax.models.precision import Precision

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}
CONVS = (("conv1", 32), ("conv2", 32), ("conv3", 64))  # 5x5, padding 2, each followed by a pool


@register("convnet4")
class ConvNet4(Precision):
    """`__call__(x, *, train)` returns float32 logits; 32x32 input (CIFAR-10)."""

    input_shape = (32, 32, 3)
    spec = ModelSpec(head=("fc",))

    num_classes: int = 10
    activation: str = "relu"  # or "tanh" (Figure 1)
    lrn: bool = True
    pool_window: int = 3  # 3: the overlapping 3/2 pooling; 2: non-overlapping 2/2
    hidden: tuple = ()  # widths of fully connected layers before the output, dropout before each
    dropout_rate: float = 0.0

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[self.activation]
        kw = self.precision
        x = x.astype(self.dtype)
        for name, features in CONVS:
            x = act(Conv(features, (5, 5), padding=2, name=name, **kw)(x))
            i = name[-1]
            if self.lrn and name != "conv3":
                x = LocalResponseNorm(name=f"lrn{i}")(x)
            x = MaxPool(self.pool_window, 2, floor=True, name=f"pool{i}")(x)
        x = x.reshape(x.shape[0], -1)
        for i, units in enumerate(self.hidden, start=1):
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{i}")(x)
            x = act(nn.Dense(units, name=f"fc_hidden{i}", **kw)(x))
        return wide(nn.Dense(self.num_classes, name="fc", **kw)(x))
