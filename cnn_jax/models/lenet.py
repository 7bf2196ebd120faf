"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, 1998), as built in the paper, and a modern variant.

`lenet5`: 32x32x1 input; C1 6@28x28 -> S2 (trainable coefficient and bias per map) -> C3
with the paper's partial connection table -> S4 -> C5 120 -> F6 84 -> 10 Euclidean RBF
units with fixed +-1 7x12 bitmaps. Squashing f(a) = 1.7159 tanh(2a/3) after every layer up
to F6. 60,000 trainable parameters. Weights ~ U(-2.4/F_in, 2.4/F_in) (appendix A).

The RBF output y_i = sum_j (x_j - w_ij)^2 is a penalty; the model returns -y as logits, so
softmax cross-entropy is the paper's MAP criterion y_D + log(sum_i exp(-y_i)) without its
constant j.

`lenet5_modern`: ReLU, max pooling, a full C3 and a linear softmax head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from cnn_jax.layers import Conv, MaxPool, check_window, checks_geometry, wide
from cnn_jax.models import ModelSpec, register
from cnn_jax.models.precision import Precision

# Which S2 maps feed each C3 map (table I of the paper).
C3_TABLE = ((0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
            (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
            (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
            (0, 1, 2, 3, 4, 5))

# Stylised 7 wide x 12 tall digits for the RBF prototypes ('#' = +1, '.' = -1).
_BITMAPS = {
    0: ".......|..###..|.#...#.|#.....#|#.....#|#.....#|#.....#|#.....#|#.....#|.#...#.|..###..|.......",
    1: ".......|...#...|..##...|.#.#...|...#...|...#...|...#...|...#...|...#...|...#...|.#####.|.......",
    2: ".......|..###..|.#...#.|#.....#|......#|.....#.|....#..|...#...|..#....|.#.....|#######|.......",
    3: ".......|.#####.|#.....#|......#|......#|..####.|......#|......#|......#|#.....#|.#####.|.......",
    4: ".......|.....#.|....##.|...#.#.|..#..#.|.#...#.|#....#.|#######|.....#.|.....#.|.....#.|.......",
    5: ".......|#######|#......|#......|######.|......#|......#|......#|......#|#.....#|.#####.|.......",
    6: ".......|..####.|.#.....|#......|#......|######.|#.....#|#.....#|#.....#|#.....#|.#####.|.......",
    7: ".......|#######|......#|.....#.|....#..|...#...|...#...|..#....|..#....|..#....|..#....|.......",
    8: ".......|.#####.|#.....#|#.....#|#.....#|.#####.|#.....#|#.....#|#.....#|#.....#|.#####.|.......",
    9: ".......|.#####.|#.....#|#.....#|#.....#|#.....#|.######|......#|......#|.....#.|.####..|.......",
}


def rbf_prototypes() -> np.ndarray:
    """(10, 84) array of +-1: the fixed RBF centres, one flattened 12x7 bitmap per digit."""
    rows = [[1.0 if c == "#" else -1.0 for c in _BITMAPS[d].replace("|", "")] for d in range(10)]
    return np.asarray(rows, np.float32)


def squash(a):
    """f(a) = A tanh(S a) with A = 1.7159, S = 2/3 (appendix A): f(1) = 1, f(-1) = -1."""
    return 1.7159 * jnp.tanh(2.0 * a / 3.0)


def lecun_uniform(fan_in: int | None = None):
    """U(-2.4 / F_in, 2.4 / F_in); F_in from the kernel shape unless given."""

    def init(key, shape, dtype=jnp.float32):
        f = fan_in or int(np.prod(shape[:-1]))
        return jax.random.uniform(key, shape, dtype, -2.4 / f, 2.4 / f)

    return init


class Subsample(nn.Module):
    """S2/S4: the sum of each 2x2 block times a trainable coefficient, plus a trainable bias."""

    @nn.compact
    def __call__(self, x):
        check_window(self.name, x, (2, 2), (2, 2), (0, 0), False)
        channels = x.shape[-1]
        coefficient = self.param("coefficient", lecun_uniform(4), (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        pooled = nn.avg_pool(wide(x), (2, 2), (2, 2)).astype(x.dtype)
        return pooled * 4.0 * coefficient.astype(x.dtype) + bias.astype(x.dtype)


class PartialConv(nn.Module):
    """C3: a 5x5 convolution where output map j sees only the input maps in `table[j]`.

    Only the connections in the table are parameters (1,500 weights + 16 biases); they are
    scattered into a dense kernel for the convolution.
    """

    table: tuple = C3_TABLE
    kernel_size: int = 5

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        check_window(self.name, x, (k, k), (1, 1), (0, 0), False)
        rows = np.array([i for maps in self.table for i in maps])
        cols = np.array([j for j, maps in enumerate(self.table) for _ in maps])
        fan_in = np.array([k * k * len(self.table[j]) for j in cols], np.float32)

        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * (2.4 / fan_in)

        kernel = self.param("kernel", init, (k, k, len(rows)))
        bias = self.param("bias", nn.initializers.zeros, (len(self.table),))
        dense = jnp.zeros((k, k, x.shape[-1], len(self.table)), x.dtype).at[:, :, rows, cols].set(kernel.astype(x.dtype))
        y = jax.lax.conv_general_dilated(x, dense, (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(x.dtype)


class EuclideanRBF(nn.Module):
    """y_i = sum_j (x_j - w_ij)^2 with fixed prototypes w (no trainable parameters)."""

    @nn.compact
    def __call__(self, x):
        w = jnp.asarray(rbf_prototypes(), x.dtype)
        return jnp.sum(jnp.square(x[:, None, :] - w[None]), axis=-1)


class _LeNet(Precision):
    input_shape = (32, 32, 1)
    spec = ModelSpec(head=("output",))

    num_classes: int = 10


@register("lenet5")
class LeNet5(_LeNet):
    """The paper's LeNet-5; returns -RBF penalties as float32 logits (10 classes only)."""

    spec = ModelSpec(head=())  # the RBF output's prototypes are fixed: no head to replace or train

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        del train  # no dropout or batch statistics in LeNet-5
        if self.num_classes != 10:
            raise ValueError(f"lenet5 has fixed RBF prototypes for the 10 digits, not {self.num_classes} "
                             "classes: use lenet5_modern for other class counts")
        conv = dict(**self.precision, kernel_init=lecun_uniform(), padding=0)
        x = squash(Conv(6, (5, 5), name="C1", **conv)(x.astype(self.dtype)))
        x = squash(Subsample(name="S2")(x))
        x = squash(PartialConv(name="C3")(x))
        x = squash(Subsample(name="S4")(x))
        x = squash(Conv(120, (5, 5), name="C5", **conv)(x))
        x = x.reshape(x.shape[0], -1)
        x = squash(nn.Dense(84, **self.precision, kernel_init=lecun_uniform(), name="F6")(x))
        return -EuclideanRBF(name="output")(wide(x))


@register("lenet5_modern")
class LeNet5Modern(_LeNet):
    """LeNet-5's shape with today's parts: ReLU, 2x2 max pooling, full C3, softmax head."""

    @checks_geometry
    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        conv = dict(**self.precision, padding=0)
        x = x.astype(self.dtype)
        x = MaxPool(2, 2, name="S2")(nn.relu(Conv(6, (5, 5), name="C1", **conv)(x)))
        x = MaxPool(2, 2, name="S4")(nn.relu(Conv(16, (5, 5), name="C3", **conv)(x)))
        x = nn.relu(Conv(120, (5, 5), name="C5", **conv)(x)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(84, **self.precision, name="F6")(x))
        return wide(nn.Dense(self.num_classes, **self.precision, name="output")(x))
