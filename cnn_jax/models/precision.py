"""The two dtypes every model and block takes, declared once.

`dtype` is what a layer computes in (bfloat16 for mixed precision), `param_dtype` what its
parameters are kept in (float32, so that small updates do not round away). A module inherits
both from `Precision` and hands them to its layers as `**self.precision`, or binds them once
with `functools.partial(nn.Dense, **self.precision)`, as flax's own examples inject `dtype`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Precision(nn.Module, kw_only=True):
    """Base of the models and of their blocks that hold layers: the dtypes their layers compute
    in and keep parameters in. Keyword-only, so that a subclass's fields without defaults (an
    Inception module's widths) may follow."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def precision(self) -> dict:
        """`dtype` and `param_dtype` as keyword arguments for a layer."""
        return {"dtype": self.dtype, "param_dtype": self.param_dtype}
