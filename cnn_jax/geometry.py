"""Window geometry: whether a kernel, stride and padding tile their input exactly.

A window layer maps W to (W - F + 2P) / S + 1. When that is not an integer the
hyper-parameters do not fit the input (W=10, F=3, P=0, S=2 gives 4.5; the CS231n notes'
"constraints on strides"), and frameworks silently floor it. The layers raise `GeometryError`
instead, naming the layer and the numbers; `nearest_valid_input` finds the closest input size
for which a whole model fits.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def pairs(value, n=2) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def symmetric_pads(padding) -> tuple[int, int]:
    """Per-axis symmetric padding as ints; 'VALID' is 0. Asymmetric or 'SAME' is not checked."""
    if padding == "VALID":
        return (0, 0)
    if isinstance(padding, int):
        return (padding, padding)
    pads = []
    for p in padding:
        lo, hi = pairs(p)
        if lo != hi:
            raise ValueError(f"asymmetric padding {padding} is not supported by checked layers")
        pads.append(lo)
    return tuple(pads)


def check_window(name, x, kernel, stride, pads, floor):
    """Checks both spatial axes of NHWC `x` for a window layer; raises `GeometryError`."""
    for axis, (size, k, s, p) in enumerate(zip(x.shape[-3:-1], kernel, stride, pads)):
        window_output_size(size, k, s, p, layer=name, axis=axis, floor=floor)


SEARCHING = contextvars.ContextVar("cnn_jax_geometry_search", default=False)


def nearest_valid_input(module: nn.Module, shape: Sequence[int], axis: int,
                        max_distance: int = 64) -> int | None:
    """Closest size along spatial `axis` of `shape` (NHWC) for which `module` builds exactly.

    A square input keeps its shape: both sides move together.
    """
    axes = (1, 2) if shape[1] == shape[2] else (1 + axis,)
    token = SEARCHING.set(True)
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
        SEARCHING.reset(token)
