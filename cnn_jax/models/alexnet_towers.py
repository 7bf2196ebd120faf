"""AlexNet as trained in the paper: two towers, one per GPU, communicating only where it says.

Half of every layer's kernels live in each tower (conv1 48+48, conv2 128+128, conv3
192+192, conv4 192+192, conv5 128+128, fc6/fc7 2048+2048, fc8 500+500). conv2, conv4 and
conv5 see only the maps of their own tower; conv3 and the fully connected layers take input
from both towers. 60,965,224 parameters.

Written tower-stacked: every parameter and activation has a leading tower axis, and each
layer is `nn.vmap`-ed over it. Where the paper's GPUs communicate, the model calls
`tower_gather` (inside a named scope `tower_gather_<layer>`), which must return every
tower's activations, and the final logits are put together by `tower_combine` (scope
`tower_gather_logits`). On one device all towers are local and both are plain
concatenation. Under `cnn_jax.parallel`, each device of the mesh's 'model' axis holds one
tower (`local_towers=1`), the gather is an `all_gather` and the combine a `psum` over
'model' (a sum of each tower's half placed in its own columns, which the compiler can prove
identical on both towers): the only cross-tower communication in the program. The model
itself never names a mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import PartitionSpec as P

from cnn_jax.layers import Conv, LocalResponseNorm, MaxPool, checks_geometry, wide
from cnn_jax.models import ModelSpec, register
from cnn_jax.models.alexnet import initializers, scaled
from cnn_jax.models.precision import Precision

# (name, features per tower, kernel, stride, padding, sees both towers)
TOWER_CONVS = (
    ("conv1", 48, 11, 4, 0, False),  # the image itself is given to both towers
    ("conv2", 128, 5, 1, 2, False),
    ("conv3", 192, 3, 1, 1, True),
    ("conv4", 192, 3, 1, 1, False),
    ("conv5", 128, 3, 1, 1, False),
)
CROSS_TOWER = ("conv3", "fc6", "fc7", "fc8", "logits")


def _per_tower(cls, **kwargs):
    """`cls` applied independently to each tower: parameters and inputs stacked on axis 0."""
    return nn.vmap(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                   in_axes=0, out_axes=0)(**kwargs)


@register("alexnet_2tower")
class AlexNetTowers(Precision):
    """The paper's two-GPU AlexNet. `__call__(x, *, train)` takes NHWC images, returns logits."""

    input_shape = (227, 227, 3)
    # Parameters are tower-stacked: their axis 0 is split over the mesh's 'model' axis, one
    # tower per device.
    spec = ModelSpec(head=("fc8",), partition_rules=((r"(conv\d|fc\d)/(kernel|bias)$", P("model")),), towers=2)

    num_classes: int = 1000
    local_towers: int | None = None  # towers held here; None: all of them
    tower_gather: Callable | None = None  # (local, ...) -> (towers, ...); None: identity
    tower_combine: Callable | None = None  # (local, B, k) -> (B, towers * k); None: concatenate
    dropout_rate: float = 0.5
    init_scheme: str = "paper"
    lrn: bool = True
    pool_window: int = 3
    floor: bool = False
    kernels: float = 1.0  # every convolution's kernel count times this (scaled-down studies)
    fc_units: int = 4096  # width of fc6 and fc7, both towers together

    def _gather(self, x, layer):
        """Every tower's activations, channels concatenated, repeated for each local tower."""
        with jax.named_scope(f"tower_gather_{layer}"):
            full = self.tower_gather(x) if self.tower_gather is not None else x
        full = concat_towers(full)
        return jnp.broadcast_to(full, (x.shape[0], *full.shape))

    def _dense(self, x, features, name):
        kernel_init, bias_init = initializers(self.init_scheme, name)
        return _per_tower(nn.Dense, features=features, kernel_init=kernel_init, bias_init=bias_init,
                          **self.precision, name=name)(x)

    @property
    def towers(self) -> int:
        return self.spec.towers

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        if self.num_classes % self.towers:
            raise ValueError(f"alexnet_2tower splits fc8 across {self.towers} towers: num_classes "
                             f"({self.num_classes}) must be a multiple of {self.towers}")
        local = self.local_towers or self.towers
        x = jnp.broadcast_to(x.astype(self.dtype), (local, *x.shape))
        for name, features, kernel, stride, pad, both in TOWER_CONVS:
            if both:
                x = self._gather(x, name)
            kernel_init, bias_init = initializers(self.init_scheme, name)
            x = nn.relu(_per_tower(Conv, features=scaled(features, self.kernels), kernel_size=(kernel, kernel),
                                   strides=stride, padding=pad, floor=self.floor, kernel_init=kernel_init,
                                   bias_init=bias_init, **self.precision,
                                   name=name)(x))
            i = name[-1]
            if self.lrn and name in ("conv1", "conv2"):
                x = _per_tower(LocalResponseNorm, name=f"lrn{i}")(x)
            if name in ("conv1", "conv2", "conv5"):
                x = _per_tower(MaxPool, window=self.pool_window, stride=2, floor=self.floor,
                               name=f"pool{i}")(x)
        x = x.reshape(*x.shape[:2], -1)
        for name in ("fc6", "fc7"):
            # Each tower drops its own units, then both towers read all the survivors.
            x = _per_tower(nn.Dropout, rate=self.dropout_rate, deterministic=not train,
                           name=f"drop{name[-1]}")(x)
            x = nn.relu(self._dense(self._gather(x, name), self.fc_units // self.towers, name))
        x = self._dense(self._gather(x, "fc8"), self.num_classes // self.towers, "fc8")
        with jax.named_scope("tower_gather_logits"):
            logits = self.tower_combine(x) if self.tower_combine is not None else concat_towers(x)
        return wide(logits)


def concat_towers(x):
    """(towers, B, k) -> (B, towers * k): every tower's outputs side by side."""
    return jnp.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], -1)
