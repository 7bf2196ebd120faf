"""GoogLeNet / Inception v1 (Szegedy et al., 2014), with its two auxiliary classifiers.

Inception modules run 1x1, 1x1 -> 3x3, 1x1 -> 5x5 and 3x3-max-pool -> 1x1 branches side by
side and concatenate them; the 1x1 "reductions" cut the cost of the wide convolutions.
'SAME' padding throughout, as in the paper's table (224 -> 112 -> 56 -> 28 -> 14 -> 7).
In training the model returns {'logits', 'aux_logits'}: heads on 4a and 4d (5x5 average
pool stride 3, 1x1 conv 128, fc 1024, dropout 0.7, fc) whose losses the train step weights
by `aux_weight` (0.3); in evaluation, plain logits. LRN constants as in the BVLC Caffe
release (local_size 5, alpha 1e-4 divided by n, beta 0.75). The paper does not give its
initialisation: kernels here are He-normal (truncated), biases 0; LeCun scaling shrinks the
ReLU activations through 22 layers and left the offline run at chance for two epochs.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import flax.linen as nn

from cnn_jax.layers import AvgPool, Conv, LocalResponseNorm, MaxPool, checks_geometry, lrn_from_caffe, wide
from cnn_jax.models import ModelSpec, register
from cnn_jax.models.precision import Precision

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) -- the paper's table 1.
MODULES = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
}
POOL_BEFORE = ("4a", "5a")
AUX_AFTER = {"4a": "aux1", "4d": "aux2"}


def _conv(features, kernel, name, stride=1, **kw):
    return Conv(features, (kernel, kernel), strides=stride, padding="SAME", name=name,
                kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"), **kw)


class Inception(Precision):
    widths: tuple

    @nn.compact
    def __call__(self, x):
        b1, r3, b3, r5, b5, proj = self.widths
        kw = self.precision
        branch1 = nn.relu(_conv(b1, 1, "b1_1x1", **kw)(x))
        branch3 = nn.relu(_conv(b3, 3, "b2_3x3", **kw)(nn.relu(_conv(r3, 1, "b2_reduce", **kw)(x))))
        branch5 = nn.relu(_conv(b5, 5, "b3_5x5", **kw)(nn.relu(_conv(r5, 1, "b3_reduce", **kw)(x))))
        pooled = MaxPool(3, 1, padding="SAME", name="b4_pool")(x)
        branch4 = nn.relu(_conv(proj, 1, "b4_proj", **kw)(pooled))
        return jnp.concatenate([branch1, branch3, branch5, branch4], axis=-1)


class AuxHead(Precision):
    num_classes: int
    dropout_rate: float = 0.7

    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = self.precision
        x = AvgPool(5, 3, name="pool")(x)
        x = nn.relu(_conv(128, 1, "conv", **kw)(x)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(1024, name="fc1", **kw)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop")(x)
        return wide(nn.Dense(self.num_classes, name="fc2", **kw)(x))


@register("googlenet")
class GoogLeNet(Precision):
    input_shape = (224, 224, 3)
    spec = ModelSpec(head=("fc", "aux1/fc2", "aux2/fc2"))

    num_classes: int = 1000
    aux_heads: bool = True
    dropout_rate: float = 0.4
    aux_dropout_rate: float = 0.7  # the paper's auxiliary heads drop 70% of fc1's outputs

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = self.precision
        lrn = lrn_from_caffe(local_size=5, alpha=1e-4, beta=0.75, k=1.0)
        x = nn.relu(_conv(64, 7, "conv1", stride=2, **kw)(x.astype(self.dtype)))
        x = LocalResponseNorm(**lrn, name="lrn1")(MaxPool(3, 2, padding="SAME", name="pool1")(x))
        x = nn.relu(_conv(64, 1, "conv2_reduce", **kw)(x))
        x = LocalResponseNorm(**lrn, name="lrn2")(nn.relu(_conv(192, 3, "conv2", **kw)(x)))
        x = MaxPool(3, 2, padding="SAME", name="pool2")(x)
        aux = []
        heads = self.aux_heads and (train or self.is_initializing())
        for name, widths in MODULES.items():
            if name in POOL_BEFORE:
                x = MaxPool(3, 2, padding="SAME", name=f"pool{int(name[0]) - 1}")(x)
            x = Inception(widths, name=f"inception{name}", **kw)(x)
            if heads and name in AUX_AFTER:
                aux.append(AuxHead(self.num_classes, self.aux_dropout_rate, name=AUX_AFTER[name], **kw)(x, train=train))
        x = AvgPool(x.shape[1], 1, name="avgpool")(x).reshape(x.shape[0], -1)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="drop")(x)
        logits = wide(nn.Dense(self.num_classes, name="fc", **kw)(x))
        return {"logits": logits, "aux_logits": tuple(aux)} if train and aux else logits


class ReductionExample(nn.Module):
    """28x28x192 -> 28x28x32 with 5x5 kernels, directly or through a 1x1 bottleneck of
    `reduce_to` channels: the cost argument for Inception's reductions."""

    input_shape = (28, 28, 192)

    reduce_to: int = 0

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        del train
        if self.reduce_to:
            x = Conv(self.reduce_to, (1, 1), use_bias=False, name="reduce_1x1")(x)
        return Conv(32, (5, 5), padding=2, use_bias=False, name="conv_5x5")(x)


googlenet_no_aux = register("googlenet_no_aux")(functools.partial(GoogLeNet, aux_heads=False))
