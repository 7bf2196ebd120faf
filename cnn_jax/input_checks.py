"""What a model says when it is handed images it cannot take: one line naming the fix, instead of
an error deep inside a layer or a silent wrong answer."""

from __future__ import annotations

import ast
import functools
import re

import flax
import jax.numpy as jnp

from cnn_jax.geometry import SEARCHING, GeometryError, nearest_valid_input


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


_SHAPE = r"(\([\d, ]*\))"
# Flax's ScopeParamShapeError as worded from flax 0.11.2 on, and before (where the two shapes are
# swapped): the groups that give parameter, scope, the shape these images need, its own shape.
_MISMATCH = ((re.compile(rf'For parameter "([^"]+)" in "([^"]+)".*?generate shape {_SHAPE}.*?has shape {_SHAPE}'),
              (1, 2, 3, 4)),
             (re.compile(rf'generate shape {_SHAPE} but got shape {_SHAPE} instead for parameter "([^"]+)" in "([^"]+)"'),
              (3, 4, 2, 1)))


def _parameter_mismatch(model: str, shape: tuple, message: str) -> InputError:
    """Flax's shape error in one line, naming channels only when they are the difference."""
    for pattern, order in _MISMATCH:
        if found := pattern.search(message):
            param, where, wanted, saved = (found.group(i) for i in order)
            break
    else:
        return InputError(f"{model}: the parameters do not fit these images ({message.split('. (https')[0]})")
    wanted, saved = ast.literal_eval(wanted), ast.literal_eval(saved)
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
            if SEARCHING.get() or err.suggestion is not None:
                raise
            size = nearest_valid_input(self.clone(parent=None), x.shape, err.axis)
            raise GeometryError(err.layer, err.size, err.kernel, err.stride, err.pad, err.axis,
                                size) from None
        except flax.errors.ScopeParamShapeError as err:
            raise _parameter_mismatch(name, x.shape, str(err)) from None

    return wrapper
