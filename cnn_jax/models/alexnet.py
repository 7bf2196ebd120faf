"""AlexNet, Krizhevsky, Sutskever & Hinton (NIPS 2012), one-tower view.

227x227x3 input (the paper's figure says 224; the arithmetic needs 227). Five convolutions,
LRN after the ReLUs of conv1 and conv2, overlapping 3/2 max pooling, dropout 0.5 on the
inputs of fc6 and fc7, and the paper's initialisation: weights ~ N(0, 0.01), biases 1 in
conv2, conv4, conv5, fc6 and fc7, 0 elsewhere.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.layers import Conv, LocalResponseNorm, MaxPool, checks_geometry
from cnn_jax.models import register

# (name, features, kernel, stride, padding); LRN + pool follow conv1 and conv2, pool follows conv5.
CONVS = (
    ("conv1", 96, 11, 4, 0),
    ("conv2", 256, 5, 1, 2),
    ("conv3", 384, 3, 1, 1),
    ("conv4", 384, 3, 1, 1),
    ("conv5", 256, 3, 1, 1),
)
POOL_AFTER = ("conv1", "conv2", "conv5")
LRN_AFTER = ("conv1", "conv2")
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")
INIT_SCHEMES = ("paper", "lecun")


def initializers(scheme: str, layer: str):
    """(kernel_init, bias_init) of `layer` under `scheme`.

    'paper': N(0, 0.01) weights, biases 1 in conv2, conv4, conv5, fc6, fc7 (section 5).
    'lecun': LeCun-normal weights, zero biases; learns within minutes where the paper's
    scheme sits on a long plateau at ln(num_classes) (ENVIRONMENT.md measurements).
    """
    if scheme == "paper":
        return nn.initializers.normal(0.01), nn.initializers.constant(1.0 if layer in BIAS_ONE else 0.0)
    if scheme == "lecun":
        return nn.initializers.lecun_normal(), nn.initializers.zeros
    raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")


@register("alexnet")
class AlexNet(nn.Module):
    """The paper's AlexNet. `__call__(x, *, train)` returns float32 logits.

    Intermediate features are reachable with `apply(..., capture_intermediates=True)`.
    """

    input_shape = (227, 227, 3)  # class constant, not a field: the size the paper's arithmetic needs

    num_classes: int = 1000
    dropout_rate: float = 0.5
    init_scheme: str = "paper"
    lrn: bool = True
    pool_window: int = 3  # 2 gives the non-overlapping 2/2 pooling of the paper's ablation
    floor: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _dense(self, x, features, name):
        kernel_init, bias_init = initializers(self.init_scheme, name)
        return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=kernel_init, bias_init=bias_init, name=name)(x)

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        for name, features, kernel, stride, pad in CONVS:
            kernel_init, bias_init = initializers(self.init_scheme, name)
            x = Conv(features, (kernel, kernel), strides=stride, padding=pad, floor=self.floor,
                     dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=kernel_init,
                     bias_init=bias_init, name=name)(x)
            x = nn.relu(x)
            i = name[-1]
            if self.lrn and name in LRN_AFTER:
                x = LocalResponseNorm(name=f"lrn{i}")(x)
            if name in POOL_AFTER:
                x = MaxPool(self.pool_window, 2, floor=self.floor, name=f"pool{i}")(x)
        x = x.reshape(x.shape[0], -1)
        for name in ("fc6", "fc7"):
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{name[-1]}")(x)
            x = nn.relu(self._dense(x, 4096, name))
        return self._dense(x, self.num_classes, "fc8").astype(jnp.float32)
