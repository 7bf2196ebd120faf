"""ResNet (He, Zhang, Ren & Sun, 2015): 18/34/50/101/152 and the CIFAR family 20/32/44/56.

a[l+2] = g(z[l+2] + a[l]); the paper's "plain" networks (plain20_cifar, plain56_cifar) are
the same layers without the a[l]. Where a shortcut changes dimensions, option 'A' subsamples
and zero-pads the identity (no parameters), option 'B' projects with a 1x1 convolution and batch
norm (only there). Convolutions have no bias (batch norm follows each). Batch-norm running
statistics live in the 'batch_stats' collection, updated in training and used in evaluation.

Geometry: the reference implementations floor (conv1 on 224: (224 - 7 + 6)/2 + 1 = 112.5
-> 112), so ResNets build with `floor=True`; the stride sits on the 3x3 convolution of a
bottleneck (torchvision's "v1.5", same parameter count as the paper's).
"""

from __future__ import annotations

import functools
import re

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.layers import BatchNorm, Conv, MaxPool, checks_geometry, one_by_one_as_product, wide
from cnn_jax.models import ModelSpec, TorchLayout, register
from cnn_jax.models.precision import Precision


class _Block(Precision):
    filters: int
    strides: int = 1
    shortcut: str = "B"
    floor: bool = True
    train: bool = False
    residual: bool = True  # False: the paper's "plain" counterpart, the same layers without shortcuts

    expansion = 1

    def conv(self, x, features, kernel, strides, name):
        return Conv(features, (kernel, kernel), strides=strides, padding=kernel // 2, use_bias=False,
                    floor=self.floor, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    conv_general_dilated=one_by_one_as_product,  # faster here (its docstring)
                    **self.precision, name=name)(x)

    def bn(self, x, name, zero=False):
        return BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5,
                            scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
                            **self.precision, name=name)(x)

    def add_shortcut(self, y, x):
        """relu(y + shortcut(x)), or relu(y) in a plain network."""
        return nn.relu((y + self.identity(x, y.shape[-1])) if self.residual else y)

    def identity(self, x, out_features):
        """The shortcut: identity, or the paper's option A or B where the shape changes."""
        if self.strides == 1 and x.shape[-1] == out_features:
            return x
        if self.shortcut == "B":
            return self.bn(self.conv(x, out_features, 1, self.strides, "proj_conv"), "proj_bn")
        if self.shortcut == "A":
            x = x[:, :: self.strides, :: self.strides, :]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, out_features - x.shape[-1])))
        raise ValueError(f"unknown shortcut option {self.shortcut!r}: use 'A' (zero-pad) or 'B' (projection)")


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR family)."""

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.bn(self.conv(x, self.filters, 3, self.strides, "conv1"), "bn1"))
        y = self.bn(self.conv(y, self.filters, 3, 1, "conv2"), "bn2")
        return self.add_shortcut(y, x)


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    @nn.compact
    def __call__(self, x):
        y = nn.relu(self.bn(self.conv(x, self.filters, 1, 1, "conv1"), "bn1"))
        y = nn.relu(self.bn(self.conv(y, self.filters, 3, self.strides, "conv2"), "bn2"))
        y = self.bn(self.conv(y, self.filters * 4, 1, 1, "conv3"), "bn3")
        return self.add_shortcut(y, x)



def torchvision_layout(model) -> TorchLayout | None:
    """torchvision's ResNet-18..152 (ImageNet; projection shortcuts): stage s, block b is
    layer{s}.{b-1}, a projection is its `downsample`. The CIFAR nets have no counterpart."""
    if model.cifar:
        return None

    def prefix(path: tuple) -> str:
        stage = re.fullmatch(r"stage(\d+)_block(\d+)", path[0])
        if not stage:
            return ".".join(path)
        inner = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}.get(path[1], path[1])
        return f"layer{stage.group(1)}.{int(stage.group(2)) - 1}.{inner}"

    return TorchLayout(prefix, requires={"shortcut": "B"})

class ResNet(Precision):
    """ImageNet ResNet (7x7 stem, max pool, four stages) or, with `cifar=True`, the paper's
    CIFAR-10 network (3x3 stem with 16 filters, three stages of 16/32/64, no max pool)."""

    stage_sizes: tuple = (2, 2, 2, 2)
    block: str = "basic"
    num_classes: int = 1000
    shortcut: str = "B"
    cifar: bool = False
    residual: bool = True  # False: the plain network of the paper's comparisons (no shortcuts)
    floor: bool = True

    spec = ModelSpec(head=("fc",), torchvision=torchvision_layout)

    @property
    def input_shape(self):
        return (32, 32, 3) if self.cifar else (224, 224, 3)

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        block_cls = {"basic": BasicBlock, "bottleneck": BottleneckBlock}[self.block]
        kw = dict(shortcut=self.shortcut, residual=self.residual, floor=self.floor, train=train, **self.precision)
        x = x.astype(self.dtype)
        width = 16 if self.cifar else 64
        x = Conv(width, (3, 3) if self.cifar else (7, 7), strides=1 if self.cifar else 2,
                 padding=1 if self.cifar else 3, use_bias=False, floor=self.floor,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                 **self.precision, name="conv1")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 **self.precision, name="bn1")(x))
        if not self.cifar:
            x = MaxPool(3, 2, padding=1, floor=self.floor, name="pool1")(x)
        for stage, blocks in enumerate(self.stage_sizes):
            for b in range(blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = block_cls(width * 2**stage, strides, name=f"stage{stage + 1}_block{b + 1}", **kw)(x)
        x = jnp.mean(x, axis=(1, 2))
        return wide(nn.Dense(self.num_classes, **self.precision,
                             name="fc")(x))


_IMAGENET = {"18": ((2, 2, 2, 2), "basic"), "34": ((3, 4, 6, 3), "basic"), "50": ((3, 4, 6, 3), "bottleneck"),
             "101": ((3, 4, 23, 3), "bottleneck"), "152": ((3, 8, 36, 3), "bottleneck")}
for _depth, (_stages, _block) in _IMAGENET.items():
    register(f"resnet{_depth}")(functools.partial(ResNet, stage_sizes=_stages, block=_block))
for _depth in (20, 32, 44, 56):
    _n = (_depth - 2) // 6
    register(f"resnet{_depth}_cifar")(functools.partial(
        ResNet, stage_sizes=(_n, _n, _n), block="basic", shortcut="A", cifar=True))
for _depth in (20, 56):  # the plain networks of Figure 6 (left)
    register(f"plain{_depth}_cifar")(functools.partial(
        ResNet, stage_sizes=((_depth - 2) // 6,) * 3, block="basic", cifar=True, residual=False))
# A tiny variant for fast tests only: one basic block per stage of the CIFAR network.
register("resnet_tiny")(functools.partial(ResNet, stage_sizes=(1, 1, 1), block="basic", cifar=True))
