"""Loss, top-k error and running means: the numbers the paper reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, in float32; NaN for a label
    outside [0, classes), so a wrong label range stops training loudly instead of skewing it."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.where(_in_range(labels, logits.shape[-1]), loss, jnp.nan)


def _in_range(labels: jax.Array, classes: int) -> jax.Array:
    return (labels >= 0) & (labels < classes)


def count_nonfinite(logits: jax.Array) -> jax.Array:
    """Per-example 1.0 where any logit is NaN or infinite: a diverged net, reported apart."""
    return jnp.any(~jnp.isfinite(logits), axis=-1).astype(jnp.float32)


def topk_error(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
    """Per-example 1.0 where the label is not among the k highest logits, else 0.0.

    Ties count against the model: the label is in the top k only if fewer than k other
    classes have a logit >= its own, so a collapsed net (all logits equal) scores 100%
    error, not 0%. A row with any non-finite logit is an error too, since NaN compares false
    and would otherwise pass, and so is a label outside [0, classes). With at most k classes
    every finite example with a valid label is correct.
    """
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    others = jnp.arange(logits.shape[-1]) != labels[:, None]
    rank = jnp.sum((logits >= label_logit) & others, axis=-1)  # classes at or above the label
    wrong = (rank >= k) | ~_in_range(labels, logits.shape[-1])
    return jnp.maximum(wrong.astype(jnp.float32), count_nonfinite(logits))


class Mean:
    """Running weighted mean on the host; `add(total, count)` takes sums over a batch."""

    def __init__(self):
        self.total, self.count = 0.0, 0.0

    def add(self, total, count=1.0):
        self.total += float(total)
        self.count += float(count)

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else float("nan")
