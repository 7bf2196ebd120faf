"""Fast formulations of standard operations, with their derivatives written out.

Each computes what its plain JAX counterpart computes (tests compare them, values and
gradients) in a form that XLA:CPU runs faster, measured by `python -m benchmarks.train_step`:
1x1 convolutions as matrix products, max pooling's derivative from slices, LRN's power by
square roots, batch-norm sums as products. They are used where they were measured: on the
CPU backend. Elsewhere each public function here is XLA's standard formulation, until a
measurement on that backend says otherwise; `forced(True/False)` overrides the choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools

import jax
import jax.numpy as jnp

_FORCED = contextvars.ContextVar("cnn_jax_fast_cpu", default=None)


def enabled() -> bool:
    """Whether the fast formulations are traced: on the CPU backend, unless `forced`."""
    forced_value = _FORCED.get()
    return jax.default_backend() == "cpu" if forced_value is None else forced_value


@contextlib.contextmanager
def forced(on: bool):
    """Traces inside the block use the fast formulations (True) or XLA's standard ones (False),
    whatever the backend; a function jitted earlier keeps the trace it has."""
    token = _FORCED.set(on)
    try:
        yield
    finally:
        _FORCED.reset(token)


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
    if not enabled():
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision)
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
    pads = _padding_pairs(x, window, strides, padding)
    return _max_pool(x, window, strides, pads) if enabled() else _reduce_max(x, window, strides, pads)


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


def negative_power(s, beta):
    """s ** -beta for s > 0 (LRN's denominator)."""
    return _negative_power(s, beta) if enabled() else jnp.power(s, -beta)


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
    if not enabled():
        return jnp.sum(x, axis=tuple(range(x.ndim - 1)))
    flat = x.reshape(-1, x.shape[-1])
    return jax.lax.dot_general(jnp.ones((flat.shape[0],), flat.dtype), flat, (((0,), (0,)), ((), ())),
                               precision=jax.lax.Precision.HIGHEST)


def batch_normalise(x, scale, bias, epsilon):
    """(y, mean, var) of `x` (at least float32) over all axes but the last; y = (x - mean) / sqrt(var + eps) * scale + bias.
    The fast form has its derivative written out; the standard one is differentiated by JAX."""
    if enabled():
        return _batch_normalise(x, scale, bias, epsilon)
    return _batch_normalise_fwd(x, scale, bias, epsilon)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_normalise(x, scale, bias, epsilon):
    return _batch_normalise_fwd(x, scale, bias, epsilon)[0]


def _batch_normalise_fwd(x, scale, bias, epsilon):
    n = x.size // x.shape[-1]
    mean = channel_sums(x) / n
    # Two passes, as PyTorch: flax's fast E[x^2] - E[x]^2 loses the variance in float32 when
    # |mean| >> spread (a channel over a few values), and with it the gradient below it
    # (tests/test_layers.py: 8 values at 50 +- 0.01, where one pass is off by more than 0.1).
    var = channel_sums(jnp.square(x - mean)) / n
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
