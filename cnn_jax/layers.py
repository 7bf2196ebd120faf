"""Layers the papers need and Flax lacks: LRN, geometry-checked convolution and pooling, and a
batch norm with flax's variables.

Every window layer checks its geometry (`cnn_jax.geometry`: a kernel, stride and padding
that do not tile the input raise `GeometryError`; `floor=True` restores the Keras/PyTorch
habit of rounding down), and the model decorator `checks_geometry` (`cnn_jax.input_checks`)
adds the nearest input size for which the whole model fits. Pooling's and batch norm's
arithmetic is in `cnn_jax.fast_cpu`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.fast_cpu import batch_normalise, channel_sums, max_pool, negative_power, one_by_one_as_product
from cnn_jax.geometry import GeometryError, check_window, nearest_valid_input, pairs, symmetric_pads, window_output_size
from cnn_jax.input_checks import InputError, check_images, checks_geometry

__all__ = [  # the geometry, fast operations and input checks are here too: models import one module
    "GeometryError", "window_output_size", "check_window", "Conv", "MaxPool", "max_pool", "AvgPool", "LocalResponseNorm",
    "lrn_from_pytorch", "lrn_from_tensorflow", "lrn_from_caffe", "checks_geometry",
    "nearest_valid_input", "InputError", "check_images", "BatchNorm", "channel_sums", "one_by_one_as_product", "wide",
]


def wide(x):
    """`x` in at least float32: bfloat16 sums, statistics and logits in float32, while a
    float64 evaluation (the tests' reference) stays float64 throughout."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Conv(nn.Conv):
    """`flax.linen.Conv` whose geometry is checked (parameter paths stay `name/kernel`)."""

    floor: bool = False

    def __call__(self, inputs):
        if self.padding != "SAME":
            check_window(self.name, inputs, self.kernel_size, pairs(self.strides or 1),
                          symmetric_pads(self.padding), self.floor)
        return super().__call__(inputs)


class _Pool(nn.Module):
    window: int = 3
    stride: int = 2
    padding: int | str = 0  # symmetric cells, or 'SAME' (output ceil(W / S), as in TF/DistBelief)
    floor: bool = False

    def _checked(self, x):
        if self.padding == "SAME":
            padding = "SAME"
        else:
            check_window(self.name, x, (self.window,) * 2, (self.stride,) * 2,
                          (self.padding,) * 2, self.floor)
            padding = ((self.padding,) * 2,) * 2
        return dict(window_shape=(self.window,) * 2, strides=(self.stride,) * 2, padding=padding)


class MaxPool(_Pool):
    """Max pooling as a named module, so it shows up in summaries (`pool1` ...).

    Pads with -inf, as frameworks do, so padding never wins the max. Computed by `max_pool`.
    """

    def __call__(self, x):
        return max_pool(x, **self._checked(x))


class AvgPool(_Pool):
    """Average pooling; padded cells are not counted (`count_include_pad=False`). Sums in at least float32."""

    def __call__(self, x):
        # Summed in float32: a bfloat16 sum of a 7x7 window keeps 8 bits of mantissa.
        return nn.avg_pool(wide(x), **self._checked(x), count_include_pad=False).astype(x.dtype)


class LocalResponseNorm(nn.Module):
    """Local response normalisation, exactly Krizhevsky et al. (2012), section 3.3.

    across channels (default):  b[i] = a[i] / (k + alpha * sum_{j=i-n//2}^{i+n//2} a[j]^2)^beta,
    the sum clipped to the existing channels 0..N-1. `within_channel=True` sums instead over
    the n x n spatial neighbourhood of the same channel (clipped at the border).

    `alpha` is *not* divided by the window size, as in the paper and TensorFlow; PyTorch and
    Caffe divide it by n (or n^2 within a channel). Use `lrn_from_pytorch`,
    `lrn_from_tensorflow` or `lrn_from_caffe` to carry their settings over unchanged.
    Computed in at least float32 (`wide`): the squares underflow in bfloat16.
    """

    size: int = 5
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75
    within_channel: bool = False

    def __call__(self, x):
        h = self.size // 2
        sq = jnp.square(wide(x))
        if self.within_channel:
            window, pad = (1, 2 * h + 1, 2 * h + 1, 1), ((0, 0), (h, h), (h, h), (0, 0))
        else:
            window, pad = (1, 1, 1, 2 * h + 1), ((0, 0), (0, 0), (0, 0), (h, h))
        total = jax.lax.reduce_window(sq, 0.0, jax.lax.add, window, (1, 1, 1, 1), pad)
        out = wide(x) * negative_power(self.k + self.alpha * total, self.beta)
        return out.astype(x.dtype)


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last: `flax.linen.BatchNorm` with the options
    the zoo uses (`use_running_average`, `momentum`, `epsilon`, dtypes, initialisers).

    The same variables ('params': scale, bias; 'batch_stats': mean, var), statistics
    (biased variance, in at least float32 whatever `dtype`; computed in two passes,
    mean((x - mean)^2), where flax's default E[x^2] - E[x]^2 cancels in float32), running averages and
    output dtype; its sums are `channel_sums` products and its derivative is written out
    (reverse mode only: `jax.jvp` through it is refused). No cross-device `axis_name`:
    statistics are per device under `pmap`.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @property
    def _stats_dtype(self):
        return jnp.promote_types(self.param_dtype, jnp.float32)

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = wide(self.param("scale", self.scale_init, (features,), self.param_dtype))
        bias = wide(self.param("bias", self.bias_init, (features,), self.param_dtype))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), self._stats_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), self._stats_dtype))
        x32 = wide(x)
        if self.use_running_average:
            y = (x32 - ra_mean.value) * (scale * jax.lax.rsqrt(ra_var.value + self.epsilon)) + bias
        else:
            y, mean, var = batch_normalise(x32, scale, bias, self.epsilon)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
        return y.astype(self.dtype or jnp.promote_types(x.dtype, self.param_dtype))  # flax's default


def lrn_from_pytorch(size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> dict:
    """Settings of `torch.nn.LocalResponseNorm(size, alpha, beta, k)` for `LocalResponseNorm`.

    PyTorch divides alpha by `size` and, for odd sizes, sums over the same centred window.
    """
    if size % 2 == 0:
        raise ValueError(f"PyTorch LRN size {size} is even: its window is off-centre and has no "
                         "equivalent in the paper's formula; use an odd size")
    return dict(size=size, alpha=alpha / size, beta=beta, k=k)


def lrn_from_tensorflow(depth_radius: int = 5, bias: float = 1.0, alpha: float = 1.0,
                        beta: float = 0.5) -> dict:
    """Settings of `tf.nn.local_response_normalization` (defaults are TF's own).

    TensorFlow takes a radius (window 2r + 1) and does not divide alpha: the paper's n=5 is r=2.
    """
    return dict(size=2 * depth_radius + 1, alpha=alpha, beta=beta, k=bias)


def lrn_from_caffe(local_size: int = 5, alpha: float = 1.0, beta: float = 0.75, k: float = 1.0,
                   norm_region: str = "ACROSS_CHANNELS") -> dict:
    """Settings of Caffe's LRN layer: alpha / n across channels, alpha / n^2 within a channel."""
    if norm_region == "ACROSS_CHANNELS":
        return dict(size=local_size, alpha=alpha / local_size, beta=beta, k=k)
    if norm_region == "WITHIN_CHANNEL":
        return dict(size=local_size, alpha=alpha / local_size**2, beta=beta, k=k,
                    within_channel=True)
    raise ValueError(f"unknown Caffe norm_region {norm_region!r}: use ACROSS_CHANNELS or WITHIN_CHANNEL")

