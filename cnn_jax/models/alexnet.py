"""AlexNet, Krizhevsky, Sutskever & Hinton (NIPS 2012), one-tower view.

227x227x3 input (the paper's figure says 224; the arithmetic needs 227). Five convolutions,
LRN after the ReLUs of conv1 and conv2, overlapping 3/2 max pooling, dropout 0.5 on the
inputs of fc6 and fc7, and the paper's initialisation: weights ~ N(0, 0.01), biases 1 in
conv2, conv4, conv5, fc6 and fc7, 0 elsewhere.
"""

from __future__ import annotations

import flax.linen as nn

from cnn_jax.layers import BatchNorm, Conv, LocalResponseNorm, MaxPool, checks_geometry, wide
from cnn_jax.models import ModelSpec, register
from cnn_jax.models.precision import Precision

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
INIT_SCHEMES = ("paper", "lecun", "he")


def initializers(scheme: str, layer: str):
    """(kernel_init, bias_init) of `layer` under `scheme`.

    'paper': N(0, 0.01) weights, biases 1 in conv2, conv4, conv5, fc6, fc7 (section 5).
    'lecun': LeCun-normal weights, zero biases; learns within minutes where the paper's
    scheme sits on a long plateau at ln(num_classes) (measured on the offline digits: the
    loss stays at ln 10 for 125+ steps).
    'he': He-normal weights (variance 2/fan-in, He et al. 2015, for ReLUs), zero biases: a
    unit-scale signal through every layer, so training leaves ln(num_classes) sooner still.
    """
    if scheme == "paper":
        return nn.initializers.normal(0.01), nn.initializers.constant(1.0 if layer in BIAS_ONE else 0.0)
    if scheme == "lecun":
        return nn.initializers.lecun_normal(), nn.initializers.zeros
    if scheme == "he":
        return nn.initializers.he_normal(), nn.initializers.zeros
    raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")


@register("alexnet")
class AlexNet(Precision):
    """The paper's AlexNet. `__call__(x, *, train)` returns float32 logits.

    Intermediate features are reachable with `apply(..., capture_intermediates=True)`.
    """

    input_shape = (227, 227, 3)  # class constant, not a field: the size the paper's arithmetic needs
    spec = ModelSpec(head=("fc8",))

    num_classes: int = 1000
    dropout_rate: float = 0.5
    init_scheme: str = "paper"
    lrn: bool = True
    pool_window: int = 3  # 2 gives the non-overlapping 2/2 pooling of the paper's ablation
    floor: bool = False
    kernels: float = 1.0  # every convolution's kernel count times this (scaled-down studies)
    conv5_kernels: float | None = None  # conv5's own multiplier (None: `kernels`); the paper's one-GPU
    # baseline halves every convolution but conv5 (section 3.2, footnote)
    fc_units: int = 4096  # width of fc6 and fc7

    def _dense(self, x, features, name):
        kernel_init, bias_init = initializers(self.init_scheme, name)
        return nn.Dense(features, **self.precision,
                        kernel_init=kernel_init, bias_init=bias_init, name=name)(x)

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(self.dtype)
        for name, features, kernel, stride, pad in CONVS:
            kernel_init, bias_init = initializers(self.init_scheme, name)
            factor = self.conv5_kernels if name == "conv5" and self.conv5_kernels is not None else self.kernels
            x = Conv(scaled(features, factor), (kernel, kernel), strides=stride, padding=pad,
                     floor=self.floor, **self.precision, kernel_init=kernel_init,
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
            x = nn.relu(self._dense(x, self.fc_units, name))
        return wide(self._dense(x, self.num_classes, "fc8"))


def scaled(features: int, factor: float) -> int:
    """A layer's kernel count times `factor` (> 0), at least one."""
    if factor <= 0:
        raise ValueError(f"kernel multiplier {factor}: must be > 0")
    return max(1, round(features * factor))


@register("alexnet_bn")
class AlexNetBN(Precision):
    """The Keras "AlexNet" printed in the lecture notes (Oxford Flowers 17).

    224 input, VALID padding (Keras floors: conv1 gives 54), 2x2 max pools, batch norm after
    each block, fc 4096-4096-1000 with dropout 0.4, a 17-way softmax. Its code's conv2 is
    5x5 (28,883,201 parameters with the batch-norm statistics, as Keras counts); the summary
    printed beside it, 28,096,769, is what an 11x11 conv2 gives (`conv2_kernel=11`).
    """

    input_shape = (224, 224, 3)
    spec = ModelSpec(head=("fc9",))

    num_classes: int = 17
    conv2_kernel: int = 5
    dropout_rate: float = 0.4

    def _bn(self, x, name, train):
        # Keras defaults: momentum 0.99, epsilon 1e-3.
        return BatchNorm(use_running_average=not train, momentum=0.99, epsilon=1e-3,
                            **self.precision, name=name)(x)

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = self.precision
        convs = (("conv1", 96, 11, 4, True), ("conv2", 256, self.conv2_kernel, 1, True),
                 ("conv3", 384, 3, 1, False), ("conv4", 384, 3, 1, False), ("conv5", 256, 3, 1, True))
        x = x.astype(self.dtype)
        for name, features, kernel, stride, pool in convs:
            x = nn.relu(Conv(features, (kernel, kernel), strides=stride, padding="VALID", floor=True,
                             name=name, **kw)(x))
            if pool:
                x = MaxPool(2, 2, floor=True, name=f"pool{name[-1]}")(x)
            x = self._bn(x, f"bn{name[-1]}", train)
        x = x.reshape(x.shape[0], -1)
        for name, features in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
            x = nn.relu(nn.Dense(features, name=name, **kw)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{name[-1]}")(x)
            x = self._bn(x, f"bn{name[-1]}", train)
        return wide(nn.Dense(self.num_classes, name="fc9", **kw)(x))
