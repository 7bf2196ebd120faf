"""Layers the papers need and Flax lacks: LRN, geometry-checked convolution and pooling.

Geometry: a window layer maps W to (W - F + 2P) / S + 1. When that is not an integer the
hyper-parameters do not fit the input (W=10, F=3, P=0, S=2 gives 4.5; the CS231n notes'
"constraints on strides"), and frameworks silently floor it. Here the layers raise
`GeometryError` instead, naming the layer and the numbers, and the model decorator
`checks_geometry` adds the nearest input size for which the whole model fits. `floor=True`
restores the Keras/PyTorch habit of rounding down.
"""

from __future__ import annotations

import ast
import contextvars
import functools
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "GeometryError", "window_output_size", "check_window", "Conv", "MaxPool", "max_pool", "AvgPool", "LocalResponseNorm",
    "lrn_from_pytorch", "lrn_from_tensorflow", "lrn_from_caffe", "checks_geometry",
    "nearest_valid_input", "InputError", "check_images", "BatchNorm", "channel_sums", "one_by_one_as_product",
]


def wide(x):
    """`x` in at least float32: bfloat16 sums, statistics and logits in float32, while a
    float64 evaluation (the tests' reference) stays float64 throughout."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class GeometryError(ValueError):
    """A window layer whose kernel, stride and padding do not tile its input exactly."""

    def __init__(self, layer, size, kernel, stride, pad, axis, suggestion=None):
        self.layer, self.size, self.kernel, self.stride, self.pad = layer, size, kernel, stride, pad
        self.axis, self.suggestion = axis, suggestion
        out = (size - kernel + 2 * pad) / stride + 1
        self.problem = msg = (f"{layer}: input {size} with kernel {kernel}, stride {stride}, padding {pad} gives "
               f"({size} - {kernel} + 2*{pad})/{stride} + 1 = {out:g}, not a whole number.")
        if suggestion is not None:
            msg += f" Nearest input size that fits the whole model: {suggestion}."
        msg += " Change the input size, or build the model with floor=True to round down."
        super().__init__(msg)


def window_output_size(size: int, kernel: int, stride: int, pad: int, *, layer: str = "layer",
                       axis: int = 0, floor: bool = False) -> int:
    """(W - F + 2P) / S + 1, raising `GeometryError` when it is not whole (unless `floor`)."""
    span = size - kernel + 2 * pad
    if span < 0:
        raise GeometryError(layer, size, kernel, stride, pad, axis)
    if span % stride and not floor:
        raise GeometryError(layer, size, kernel, stride, pad, axis)
    return span // stride + 1


def _pairs(value, n=2) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def _symmetric_pads(padding) -> tuple[int, int]:
    """Per-axis symmetric padding as ints; 'VALID' is 0. Asymmetric or 'SAME' is not checked."""
    if padding == "VALID":
        return (0, 0)
    if isinstance(padding, int):
        return (padding, padding)
    pads = []
    for p in padding:
        lo, hi = _pairs(p)
        if lo != hi:
            raise ValueError(f"asymmetric padding {padding} is not supported by checked layers")
        pads.append(lo)
    return tuple(pads)


def check_window(name, x, kernel, stride, pads, floor):
    """Checks both spatial axes of NHWC `x` for a window layer; raises `GeometryError`."""
    for axis, (size, k, s, p) in enumerate(zip(x.shape[-3:-1], kernel, stride, pads)):
        window_output_size(size, k, s, p, layer=name, axis=axis, floor=floor)


def one_by_one_as_product(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
    """`lax.conv_general_dilated` for NHWC/HWIO operands, with 1x1 kernels as a matrix product.

    A 1x1 convolution is a product over channels at every (strided) position. Pass it as a
    `Conv`'s `conv_general_dilated` where it pays, which is measured, not assumed: on 2 CPU
    cores it made ResNet-50's train step 18% faster (batch 16: 6.2 -> 7.3 images/s; XLA
    computes a convolution's kernel gradient by transposing the activations to put the batch
    innermost) and GoogLeNet's 25% slower (batch 32: 17.1 -> 12.9), whose 1x1 outputs feed
    concatenations rather than batch norm (`python -m benchmarks.train_step`).
    """
    spatial = rhs.ndim - 2
    unpadded = padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)
    plain = (rhs.shape[:spatial] == (1,) * spatial and feature_group_count == 1 and unpadded
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
    if not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision)
    if any(s != 1 for s in window_strides):
        lhs = lhs[(slice(None), *(slice(None, None, s) for s in window_strides))]
    return jax.lax.dot_general(lhs, rhs.reshape(rhs.shape[-2:]), (((lhs.ndim - 1,), (0,)), ((), ())),
                               precision=precision)


class Conv(nn.Conv):
    """`flax.linen.Conv` whose geometry is checked (parameter paths stay `name/kernel`)."""

    floor: bool = False

    def __call__(self, inputs):
        if self.padding != "SAME":
            check_window(self.name, inputs, self.kernel_size, _pairs(self.strides or 1),
                          _symmetric_pads(self.padding), self.floor)
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


def _padding_pairs(x, window, strides, padding) -> tuple:
    if isinstance(padding, str):
        return tuple(jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding))
    return tuple(tuple(p) for p in padding)


def max_pool(x, window_shape, strides, padding="VALID"):
    """`flax.linen.max_pool` on NHWC `x`, with a derivative that is cheap on CPU.

    The value is the same `reduce_window` max. Its derivative routes each output's tangent
    to the first maximal input of its window in row-major order, the element XLA's
    `select_and_scatter` picks, so gradients are the same numbers. It is written as one
    strided slice per window offset; XLA:CPU expands `select_and_scatter` into an
    index-carrying `reduce_window` and a scatter, which made the pooling gradients of
    AlexNet's train step cost more than its forward convolutions.
    """
    window, strides = tuple(window_shape), tuple(strides)
    return _max_pool(x, window, strides, _padding_pairs(x, window, strides, padding))


def _reduce_max(x, window, strides, pads):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1),
                                 ((0, 0), *pads, (0, 0)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
    return _reduce_max(x, window, strides, pads)


@_max_pool.defjvp
def _max_pool_jvp(window, strides, pads, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _max_pool(x, window, strides, pads)  # itself, so that higher derivatives pick the same maxima
    full = ((0, 0), *pads, (0, 0))
    x, dx = jnp.pad(x, full, constant_values=-jnp.inf), jnp.pad(dx, full)
    taken = jnp.zeros(y.shape, bool)
    dy = jnp.zeros(y.shape, dx.dtype)
    for offset in itertools.product(*(range(w) for w in window)):
        start = (0, *offset, 0)
        limit = (x.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, y.shape[1:3], strides)), x.shape[3])
        step = (1, *strides, 1)
        hit = (jax.lax.slice(x, start, limit, step) == y) & ~taken
        taken = taken | hit
        dy = dy + jnp.where(hit, jax.lax.slice(dx, start, limit, step), 0)
    return y, dy


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
        out = wide(x) * _negative_power(self.k + self.alpha * total, self.beta)
        return out.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _negative_power(s, beta):
    """s ** -beta for s > 0, with square roots for the paper's beta = 0.75 (and 0.5).

    `x ** beta` with a float exponent costs an exp and a log per element, and its
    derivative a second power: LRN's two powers cost AlexNet's train step more than its
    pooling on CPU. d/ds s^-beta = -beta s^-beta / s reuses the value.
    """
    if beta == 0.75:
        return jax.lax.rsqrt(s) * jax.lax.rsqrt(jnp.sqrt(s))
    if beta == 0.5:
        return jax.lax.rsqrt(s)
    return jnp.exp(-beta * jnp.log(s))


@_negative_power.defjvp
def _negative_power_jvp(beta, primals, tangents):
    (s,), (ds,) = primals, tangents
    value = _negative_power(s, beta)
    return value, -beta * value / s * ds


def channel_sums(x):
    """Per-channel sums of (..., C) `x` over every other axis, as a product with a ones vector.

    The same sum as `x.sum(axis=(0, ..., ndim - 2))`; XLA:CPU computes that reduction over
    the major axes ~50x slower than the matrix product (1.6M elements: 4.9 ms against 0.09),
    and batch norm's forward and backward are such sums.
    """
    flat = x.reshape(-1, x.shape[-1])
    return jax.lax.dot_general(jnp.ones((flat.shape[0],), flat.dtype), flat, (((0,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_normalise(x, scale, bias, epsilon):
    """(y, mean, var) of `x` (at least float32) over all axes but the last; y = (x - mean) / sqrt(var + eps) * scale + bias."""
    return _batch_normalise_fwd(x, scale, bias, epsilon)[0]


def _batch_normalise_fwd(x, scale, bias, epsilon):
    n = x.size // x.shape[-1]
    mean = channel_sums(x) / n
    var = jnp.maximum(channel_sums(jnp.square(x)) / n - jnp.square(mean), 0.0)  # flax's fast variance
    inv = jax.lax.rsqrt(var + epsilon)
    return ((x - mean) * (scale * inv) + bias, mean, var), (x, mean, inv, scale)


def _batch_normalise_bwd(epsilon, res, cotangents):
    del epsilon
    x, mean, inv, scale = res
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    xhat = (x - mean) * inv
    dbias, dscale = channel_sums(dy), channel_sums(dy * xhat)
    dx = (scale * inv) * (dy - (dbias + xhat * dscale) / n)
    dx = dx + (dmean + 2.0 * dvar * (x - mean)) / n  # the statistics' own cotangents (usually zero)
    return dx, dscale, dbias


_batch_normalise.defvjp(_batch_normalise_fwd, _batch_normalise_bwd)


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last: `flax.linen.BatchNorm` with the options
    the zoo uses (`use_running_average`, `momentum`, `epsilon`, dtypes, initialisers).

    The same variables ('params': scale, bias; 'batch_stats': mean, var), statistics
    (biased variance, E[x^2] - E[x]^2, in at least float32 whatever `dtype`), running averages and
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
            y, mean, var = _batch_normalise(x32, scale, bias, self.epsilon)
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


_SEARCHING = contextvars.ContextVar("cnn_jax_geometry_search", default=False)


def nearest_valid_input(module: nn.Module, shape: Sequence[int], axis: int,
                        max_distance: int = 64) -> int | None:
    """Closest size along spatial `axis` of `shape` (NHWC) for which `module` builds exactly.

    A square input keeps its shape: both sides move together.
    """
    axes = (1, 2) if shape[1] == shape[2] else (1 + axis,)
    token = _SEARCHING.set(True)
    try:
        for d in range(1, max_distance + 1):
            for size in (shape[1 + axis] + d, shape[1 + axis] - d):
                if size < 1:
                    continue
                trial = list(shape)
                trial[0] = 1
                for a in axes:
                    trial[a] = size
                x = jax.ShapeDtypeStruct(tuple(trial), jnp.float32)
                try:
                    jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
                    return size
                except GeometryError:
                    continue
        return None
    finally:
        _SEARCHING.reset(token)


class InputError(ValueError):
    """Images a model cannot take: not a (batch, height, width, channels) float batch, or with
    another channel count than its parameters."""


def check_images(x, model: str):
    """Refuses what would otherwise fail deep inside a layer, or pass silently: a batch axis
    left out, PyTorch's channels-first layout, or raw integer pixels not yet mean-subtracted."""
    if getattr(x, "ndim", None) != 4:
        raise InputError(f"{model} takes images of shape (batch, height, width, channels), got shape "
                         f"{tuple(getattr(x, 'shape', ()))}: add the batch axis (images[None]) or reshape")
    if x.shape[1] in (1, 3, 4) and x.shape[-1] > 4:
        raise InputError(f"{model} takes channels-last images (batch, height, width, channels), got shape "
                         f"{tuple(x.shape)}, which looks channels-first (NCHW): pass images.transpose(0, 2, 3, 1)")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"{model} takes float images (mean-subtracted pixels), got {x.dtype}: pass uint8 images "
                         "through cnn_jax.data.augment.Preprocessor, or convert and normalise them first")


def _parameter_mismatch(model: str, shape: tuple, message: str) -> InputError:
    """Flax's shape error in one line, naming channels only when they are the difference."""
    found = re.search(r'"(\w+)" in "([^"]+)".*?shape (\([\d, ]+\)).*?shape (\([\d, ]+\))', message)
    if not found:
        return InputError(f"{model}: the parameters do not fit these images ({message.split('. (https')[0]})")
    param, where, wanted, saved = found.group(1), found.group(2), *map(ast.literal_eval, found.group(3, 4))
    if len(wanted) == len(saved) == 4 and wanted[:2] == saved[:2] and wanted[-1] == saved[-1] \
            and wanted[2] == shape[-1] != saved[2]:
        return InputError(f"{model} got images with {shape[-1]} channel(s) but its parameters take {saved[2]} "
                          f"({where}/{param}): give it {saved[2]}-channel images, or parameters made for these")
    return InputError(f"{model}: parameter {where}/{param} has shape {saved} but these images of shape "
                      f"{tuple(shape)} need {wanted}: the parameters were made for another input size or class "
                      "count; initialise for these images or pass parameters that match them")


def checks_geometry(call):
    """Decorates a model's `__call__`: `check_images` on its input, and geometry errors that
    name a whole-model input size that fits."""

    @functools.wraps(call)
    def wrapper(self, x, *args, **kwargs):
        name = type(self).__name__
        check_images(x, name)
        try:
            return call(self, x, *args, **kwargs)
        except GeometryError as err:
            if _SEARCHING.get() or err.suggestion is not None:
                raise
            size = nearest_valid_input(self.clone(parent=None), x.shape, err.axis)
            raise GeometryError(err.layer, err.size, err.kernel, err.stride, err.pad, err.axis,
                                size) from None
        except flax.errors.ScopeParamShapeError as err:
            raise _parameter_mismatch(name, x.shape, str(err)) from None

    return wrapper
