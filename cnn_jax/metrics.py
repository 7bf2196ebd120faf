"""Loss, top-k error and running means: the numbers the paper reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def topk_error(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
    """Per-example 1.0 where the label is not among the k highest logits, else 0.0.

    Ties are counted against the model: a label whose logit equals the k-th largest but is
    not strictly above enough others is in the top k only if fewer than k logits beat it.
    With fewer than k classes every example is correct.
    """
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # how many classes beat the label
    return (rank >= k).astype(jnp.float32)


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
