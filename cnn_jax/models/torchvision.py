"""AlexNet and GoogLeNet as torchvision defines them, so that its published weights load.

Neither is the paper's network. torchvision's AlexNet follows Krizhevsky's one-GPU variant
("One weird trick", 2014): 64-192-384-256-256 kernels, no LRN, floor geometry on 224x224
input and an adaptive 6x6 average pool before fc6 (61,100,840 parameters). Its GoogLeNet
puts batch norm (epsilon 0.001) after every bias-free convolution, has no LRN, uses a 3x3
kernel in the branch the paper calls 5x5, pools with PyTorch's `ceil_mode`, averages the
auxiliary heads' input to 4x4 adaptively, and drops out 0.2 before fc (6,624,904 parameters
without the auxiliary heads). Module names follow torchvision's state-dict keys
(`cnn_jax.weights` maps them). Initialisation is flax's default: these models exist to
receive weights.
"""

from __future__ import annotations

import functools
import re

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.layers import BatchNorm, Conv, MaxPool, checks_geometry, max_pool, wide
from cnn_jax.models import ModelSpec, TorchLayout, register
from cnn_jax.models.googlenet import MODULES
from cnn_jax.models.precision import Precision


def adaptive_avg_pool(x, size: int):
    """PyTorch's `adaptive_avg_pool2d` to size x size on NHWC `x`: output cell i averages
    input rows floor(i*H/size) to ceil((i+1)*H/size), and the same for columns (float32 sums)."""
    dtype, x = x.dtype, wide(x)
    for axis in (1, 2):
        n = x.shape[axis]
        if n == size:
            continue
        cells = [jnp.take(x, jnp.arange(i * n // size, -(-(i + 1) * n // size)), axis=axis).mean(axis, keepdims=True)
                 for i in range(size)]
        x = jnp.concatenate(cells, axis=axis)
    return x.astype(dtype)


def ceil_pads(size: int, window: int, stride: int, pad: int) -> tuple[int, int]:
    """(before, after) padding that gives PyTorch's `ceil_mode=True` output size: the last
    window may overhang the input (padded with -inf), but must start inside it."""
    out = -(-(size + 2 * pad - window) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return pad, (out - 1) * stride + window - size - pad


class CeilMaxPool(nn.Module):
    """Max pooling with PyTorch's `ceil_mode=True` (torchvision's GoogLeNet)."""

    window: int = 3
    stride: int = 2
    padding: int = 0

    def __call__(self, x):
        pads = tuple(ceil_pads(n, self.window, self.stride, self.padding) for n in x.shape[1:3])
        return max_pool(x, (self.window,) * 2, (self.stride,) * 2, pads)


ALEXNET_NAMES = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
                 "conv5": "features.10", "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}


def alexnet_layout(model) -> TorchLayout:
    return TorchLayout(lambda path: ALEXNET_NAMES[path[0]], chw={("fc6",): 256})


def googlenet_layout(model) -> TorchLayout:
    """Flax's branch2_1 is torchvision's branch2.1; the auxiliary heads' fc1 reads (128, 4, 4)."""
    return TorchLayout(lambda path: re.sub(r"branch(\d)_(\d)", r"branch\1.\2", ".".join(path)),
                       chw={("aux1", "fc1"): 128, ("aux2", "fc1"): 128})


@register("alexnet_torchvision")
class AlexNetTorchvision(Precision):
    """torchvision's AlexNet (see the module docstring). Returns float32 logits."""

    input_shape = (224, 224, 3)
    spec = ModelSpec(head=("fc8",), torchvision=alexnet_layout)

    num_classes: int = 1000
    dropout_rate: float = 0.5

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = self.precision
        x = x.astype(self.dtype)
        for name, features, kernel, stride, pad in (("conv1", 64, 11, 4, 2), ("conv2", 192, 5, 1, 2),
                                                    ("conv3", 384, 3, 1, 1), ("conv4", 256, 3, 1, 1),
                                                    ("conv5", 256, 3, 1, 1)):
            x = nn.relu(Conv(features, (kernel, kernel), strides=stride, padding=pad, floor=True, name=name, **kw)(x))
            if name in ("conv1", "conv2", "conv5"):
                x = MaxPool(3, 2, floor=True, name=f"pool{name[-1]}")(x)
        x = adaptive_avg_pool(x, 6).reshape(x.shape[0], -1)
        for name in ("fc6", "fc7"):
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"drop{name[-1]}")(x)
            x = nn.relu(nn.Dense(4096, name=name, **kw)(x))
        return wide(nn.Dense(self.num_classes, name="fc8", **kw)(x))


class BasicConv(Precision):
    """Convolution without bias, batch norm (epsilon 0.001), ReLU: torchvision's BasicConv2d."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0

    @nn.compact
    def __call__(self, x, train: bool):
        kw = self.precision
        x = Conv(self.features, (self.kernel,) * 2, strides=self.stride, padding=self.padding, use_bias=False,
                 floor=True, name="conv", **kw)(x)
        return nn.relu(BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, name="bn", **kw)(x))


class InceptionTorchvision(Precision):
    widths: tuple  # (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (a 3x3 here), pool proj)

    @nn.compact
    def __call__(self, x, train: bool):
        b1, r3, b3, r5, b5, proj = self.widths
        conv = functools.partial(BasicConv, **self.precision)
        branch1 = conv(b1, name="branch1")(x, train)
        branch2 = conv(b3, 3, padding=1, name="branch2_1")(conv(r3, name="branch2_0")(x, train), train)
        branch3 = conv(b5, 3, padding=1, name="branch3_1")(conv(r5, name="branch3_0")(x, train), train)
        branch4 = conv(proj, name="branch4_1")(CeilMaxPool(3, 1, 1, name="branch4_0")(x), train)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class AuxTorchvision(Precision):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        kw = self.precision
        x = BasicConv(128, name="conv", **kw)(adaptive_avg_pool(x, 4), train).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(1024, name="fc1", **kw)(x))
        x = nn.Dropout(0.7, deterministic=not train, name="drop")(x)
        return wide(nn.Dense(self.num_classes, name="fc2", **kw)(x))


# torchvision's widths are the paper's table 1, `googlenet.MODULES` (its "5x5" column holds
# 3x3 kernels here).
_POOL_BEFORE = {"4a": ("maxpool3", 3), "5a": ("maxpool4", 2)}
_AUX_AFTER = {"4a": "aux1", "4d": "aux2"}
# `transform_input`: torchvision's pretrained GoogLeNet takes images normalised with the
# ImageNet mean and deviation and re-normalises them to (x - 0.5) / 0.5 per channel.
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@register("googlenet_torchvision")
class GoogLeNetTorchvision(Precision):
    """torchvision's GoogLeNet (see the module docstring). In training with `aux_heads`, returns
    {'logits', 'aux_logits'} as `googlenet` does; else float32 logits."""

    input_shape = (224, 224, 3)
    spec = ModelSpec(head=("fc", "aux1/fc2", "aux2/fc2"), torchvision=googlenet_layout)

    num_classes: int = 1000
    aux_heads: bool = True
    dropout_rate: float = 0.2
    transform_input: bool = False  # True for torchvision's published weights

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = self.precision
        if self.transform_input:
            x = x * (jnp.asarray(_IMAGENET_STD) / 0.5) + (jnp.asarray(_IMAGENET_MEAN) - 0.5) / 0.5
        x = x.astype(self.dtype)
        x = CeilMaxPool(3, 2, name="maxpool1")(BasicConv(64, 7, 2, 3, name="conv1", **kw)(x, train))
        x = BasicConv(192, 3, padding=1, name="conv3", **kw)(BasicConv(64, name="conv2", **kw)(x, train), train)
        x = CeilMaxPool(3, 2, name="maxpool2")(x)
        aux = []
        heads = self.aux_heads and (train or self.is_initializing())
        for name, widths in MODULES.items():
            if name in _POOL_BEFORE:
                pool, window = _POOL_BEFORE[name]
                x = CeilMaxPool(window, 2, name=pool)(x)
            x = InceptionTorchvision(widths, name=f"inception{name}", **kw)(x, train)
            if heads and name in _AUX_AFTER:
                aux.append(AuxTorchvision(self.num_classes, name=_AUX_AFTER[name], **kw)(x, train))
        x = jnp.mean(wide(x), axis=(1, 2)).astype(self.dtype)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop")(x)
        logits = wide(nn.Dense(self.num_classes, name="fc", **kw)(x))
        return {"logits": logits, "aux_logits": tuple(aux)} if train and aux else logits
