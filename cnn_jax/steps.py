"""The train state and the pure steps: what a researcher's own loop jits.

The steps are pure functions of (state, batch, rng): dropout keys come from
`fold_in(rng, state.step)`, not from the state, so a resumed run draws the same masks as an
uninterrupted one. Models may return logits, or a dict {'logits', 'aux_logits'} (auxiliary
heads, weighted by `aux_weight` in the loss), and may keep 'batch_stats': the step handles
all of these without model-specific branches.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from cnn_jax import metrics, optim


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    plateau: optim.PlateauState  # the paper's manual schedule, checkpointed with the rest
    apply_fn: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def _plateau_arrays(p: optim.PlateauState) -> optim.PlateauState:
    return optim.PlateauState(np.asarray(p.best, np.float32), np.asarray(p.bad_evals, np.int32),
                              np.asarray(p.drops, np.int32), np.asarray(p.scale, np.float32))


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple) -> TrainState:
    # lazy_init computes only what the variables need (no forward pass): the same values as
    # `init`, bit for bit, in about two thirds of its time.
    variables = model.lazy_init(rng, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      plateau=_plateau_arrays(optim.PlateauState()), apply_fn=model.apply, tx=tx)


def _split_outputs(out):
    if isinstance(out, dict):
        return out["logits"], tuple(out.get("aux_logits", ()))
    return out, ()


def _variables(state: TrainState, params):
    return {"params": params, "batch_stats": state.batch_stats} if state.batch_stats else {"params": params}


def loss_and_metrics(state: TrainState, params, batch, rng, aux_weight: float):
    """Mean cross-entropy (+ aux_weight x each auxiliary head's), and batch top-1/5 error."""
    mutable = ["batch_stats"] if state.batch_stats else False
    out = state.apply_fn(_variables(state, params), batch["image"], train=True,
                         rngs={"dropout": rng}, mutable=mutable)
    out, updates = out if mutable else (out, {})
    logits, aux = _split_outputs(out)
    loss = metrics.cross_entropy(logits, batch["label"]).mean()
    for aux_logits in aux:
        loss += aux_weight * metrics.cross_entropy(aux_logits, batch["label"]).mean()
    stats = {"loss": loss, "top1_error": metrics.topk_error(logits, batch["label"], 1).mean(),
             "top5_error": metrics.topk_error(logits, batch["label"], 5).mean()}
    return loss, (stats, updates)


def train_step(state: TrainState, batch: dict, rng: jax.Array, prep, aux_weight: float = 0.3,
               axis_name: str | None = None):
    """One optimiser step. Pure: jit it with the state donated.

    `prep` (`data.augment.Preprocessor`) turns a uint8 batch of stored squares into the
    network's input on the device: mean subtraction, random crop and mirror, PCA colour
    noise. With `prep=None`, `batch['image']` is the network's input as given (your own float
    arrays). The preprocessor's draws and the dropout masks come from `fold_in(rng, step)`.
    `axis_name`: only under `pmap`, where each device holds a slice of the batch; gradients,
    metrics and batch-norm statistics are then averaged over that axis.

    Your own loop on your own arrays (float, channels last: NHWC):

    >>> import jax, jax.numpy as jnp
    >>> from cnn_jax import get_model, optim
    >>> from cnn_jax.train import create_train_state, train_step
    >>> model = get_model("lenet5", num_classes=10)
    >>> tx = optim.make_optimizer("paper_sgd", 0.01, weight_decay=5e-4)
    >>> state = create_train_state(jax.random.key(0), model, tx, input_shape=(32, 32, 1))
    >>> step = jax.jit(train_step, donate_argnums=0)  # prep=None: the images as given
    >>> batch = {"image": jax.random.normal(jax.random.key(1), (64, 32, 32, 1)), "label": jnp.arange(64) % 10}
    >>> losses = []
    >>> for _ in range(20):
    ...     state, stats = step(state, batch, jax.random.key(2), None)
    ...     losses.append(float(stats["loss"]))
    >>> losses[-1] < losses[0] and int(state.step)
    20
    """
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    augment_key, dropout_key = jax.random.split(rng)
    if prep is not None:
        batch = {**batch, "image": prep.train(batch["image"], augment_key)}
    elif not jnp.issubdtype(batch["image"].dtype, jnp.floating):
        raise TypeError(f"train_step(prep=None) takes the network's input as floats, not {batch['image'].dtype} "
                        "images: convert and normalise them first, or pass a preprocessor "
                        "(cnn_jax.data.augment.make_preprocessor)")
    grad_fn = jax.grad(loss_and_metrics, argnums=1, has_aux=True)
    grads, (stats, updates) = grad_fn(state, state.params, batch, dropout_key, aux_weight)
    if axis_name is not None:
        grads, stats, updates = jax.lax.pmean((grads, stats, updates), axis_name)
    param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                          opt_state=opt_state, batch_stats=updates.get("batch_stats", state.batch_stats))
    stats["learning_rate"] = optim.current_learning_rate(opt_state)
    return state, stats


def eval_step(state: TrainState, batch: dict, prep=None, crops: str = "centre") -> dict:
    """Sums over the batch of loss, top-1/top-5 errors and non-finite outputs, counting only
    mask == 1 examples.

    With `prep`, uint8 images are cropped on the device ('centre' or 'ten'); without it,
    `batch['image']` is the network's input. Images of shape (B, crops, H, W, C) are several
    views of each example: their softmax outputs are averaged, as in the paper's test.
    """
    images = batch["image"] if prep is None else prep.evaluate(batch["image"], crops)
    views = images.shape[1] if images.ndim == 5 else 1
    out = state.apply_fn(_variables(state, state.params), images.reshape(-1, *images.shape[-3:]), train=False)
    logits, _ = _split_outputs(out)
    bad = metrics.count_nonfinite(logits).reshape(-1, views).max(1)
    if views > 1:
        probs = jax.nn.softmax(logits.astype(jnp.float32)).reshape(-1, views, logits.shape[-1]).mean(1)
        logits = jnp.log(probs)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    return {"loss": jnp.sum(metrics.cross_entropy(logits, batch["label"]) * mask),
            "top1_error": jnp.sum(metrics.topk_error(logits, batch["label"], 1) * mask),
            "top5_error": jnp.sum(metrics.topk_error(logits, batch["label"], 5) * mask),
            "nonfinite": jnp.sum(bad * mask), "count": jnp.sum(mask)}


@jax.jit
def all_finite(tree) -> jax.Array:
    """One device scalar: every floating-point leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
