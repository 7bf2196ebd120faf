"""Optimisers as optax chains: the AlexNet update rule, decoupled SGDW, schedules, masks.

The paper (section 5) updates

    v <- 0.9 v - 0.0005 eps w - eps <dL/dw>,     w <- w + v,

so the learning rate eps is multiplied into the velocity at every step. optax's `sgd`
accumulates the raw gradients and scales *after* the trace (w <- w - eps * trace). The two
agree while eps is constant, but after a drop from eps to eps/10 optax also shrinks the
momentum already accumulated, so the next steps differ by the factor 10 on the old
velocity. `paper_sgd` implements the paper's form; `optax_sgd` is kept for comparison.

Every builder here returns an `optax.GradientTransformation` whose state carries the
hyper-parameters (`optax.inject_hyperparams`): `set_lr_scale` multiplies the learning rate
from the host, which is how the paper's "divide by 10 when the validation error stops
improving" schedule (`plateau_update`) acts between steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cnn_jax.trees import path_name

Schedule = Callable[[jax.Array], jax.Array]


class PaperMomentumState(NamedTuple):
    velocity: optax.Updates


def paper_momentum(learning_rate: float, momentum: float = 0.9) -> optax.GradientTransformation:
    """v <- momentum * v - learning_rate * u; the update is v (u: gradient plus decay)."""

    def init(params):
        return PaperMomentumState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        velocity = jax.tree.map(lambda v, u: momentum * v - learning_rate * u, state.velocity, updates)
        return velocity, PaperMomentumState(velocity)

    return optax.GradientTransformation(init, update)


def decay_mask(which: str = "all") -> Callable | None:
    """Which parameters weight decay touches, as an optax mask over parameter paths.

    'all': every parameter, as the paper did. 'kernels': only leaves named `kernel`
    (biases, batch-norm scales and offsets and LeNet's map coefficients are not decayed).
    """
    if which == "all":
        return None
    if which == "kernels":
        return lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
    raise ValueError(f"unknown weight-decay mask {which!r}: use 'all' or 'kernels'")


def paper_sgd(learning_rate: float | Schedule, momentum=0.9, weight_decay=5e-4, mask=None):
    """Krizhevsky et al.'s rule: decay and gradient enter the velocity, scaled by eps.

    `learning_rate` is a number or, as in every optax optimiser, a schedule (a function of
    the step count): then v <- momentum * v - schedule(t) * u is optax's trace of the
    gradient scaled by -schedule(t) (`optax.scale_by_schedule`, which counts the steps).
    """
    if callable(learning_rate):
        return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                           optax.scale_by_schedule(lambda count: -learning_rate(count)),
                           optax.trace(decay=momentum))
    return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                       paper_momentum(learning_rate, momentum))


def sgdw(learning_rate, momentum=0.9, weight_decay=5e-4, mask=None):
    """Momentum SGD with decoupled weight decay (Loshchilov & Hutter, 2019).

    w <- w - eps * (m + lambda * w) with m <- momentum * m + g: the decay bypasses the
    momentum buffer. The decay is scaled by the learning rate (optax/PyTorch convention),
    where the paper scales it by the schedule multiplier only; the two coincide with
    lambda_here = lambda_paper / eps_0.
    """
    return optax.chain(optax.trace(decay=momentum), optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


def optax_sgd(learning_rate, momentum=0.9, weight_decay=5e-4, mask=None):
    """optax's coupled SGD: decay in the gradient, learning rate applied after the trace."""
    return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                       optax.sgd(learning_rate, momentum=momentum))


OPTIMIZERS = {"paper_sgd": paper_sgd, "sgdw": sgdw, "optax_sgd": optax_sgd}


def parameter_labels(frozen: str = "", slow: str = "") -> Callable:
    """params -> a tree of 'frozen', 'slow' or 'train' per leaf, by `re.search` of the
    regular expressions on its path ('conv1/kernel', 'stage1_block1/bn1/scale')."""

    def label(path, _):
        name = path_name(path)
        if frozen and re.search(frozen, name):
            return "frozen"
        return "slow" if slow and re.search(slow, name) else "train"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(name: str, learning_rate: float | Schedule, *, momentum: float = 0.9,
                   weight_decay: float = 5e-4, decay: str = "all", frozen: str = "", slow: str = "",
                   slow_lr_scale: float = 1.0) -> optax.GradientTransformation:
    """One of `OPTIMIZERS`, with the learning rate = schedule(step) * lr_scale.

    `lr_scale` lives in the optimiser state (see `set_lr_scale`), so it is checkpointed and
    a resumed run continues with the same rate. Parameters whose path matches `frozen` get
    no update, no weight decay and no optimiser state (`optax.multi_transform` with
    `optax.set_to_zero`); those matching `slow` train at `slow_lr_scale` times the rate
    (a pretrained backbone under a new head).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    mask = decay_mask(decay)

    def build(learning_rate, lr_scale, momentum, weight_decay):
        rule = lambda rate: OPTIMIZERS[name](rate, momentum, weight_decay, mask)  # noqa: E731
        if not (frozen or slow):
            return rule(learning_rate * lr_scale)
        return optax.multi_transform({"train": rule(learning_rate * lr_scale), "frozen": optax.set_to_zero(),
                                      "slow": rule(learning_rate * lr_scale * slow_lr_scale)},
                                     parameter_labels(frozen, slow))

    return optax.inject_hyperparams(build)(learning_rate=learning_rate, lr_scale=1.0,
                                           momentum=momentum, weight_decay=weight_decay)


def set_lr_scale(opt_state, scale: float):
    """The optimiser state with the learning-rate multiplier replaced (host side, between steps)."""
    hyper = dict(opt_state.hyperparams)
    hyper["lr_scale"] = jnp.asarray(scale, dtype=jnp.asarray(hyper["lr_scale"]).dtype)
    return opt_state._replace(hyperparams=hyper)


def current_learning_rate(opt_state) -> jax.Array:
    """The rate the last update used (the schedule's value times the multiplier)."""
    return opt_state.hyperparams["learning_rate"] * opt_state.hyperparams["lr_scale"]


# ---- schedules ---------------------------------------------------------------------------

SCHEDULES = ("plateau", "constant", "step", "cosine")


def is_fraction(bound) -> bool:
    """Whether a step boundary is a fraction of the run (0.75: three quarters through) rather
    than a step number; such a boundary moves when the run's length does."""
    return isinstance(bound, float) and 0 < bound < 1


def make_schedule(kind: str, base: float, *, total_steps: int = 0, boundaries=(),
                  factor: float = 0.1, warmup_steps: int = 0) -> float | Schedule:
    """'constant' and 'plateau' (constant here, dropped by `plateau_update`), 'step'
    (multiply by `factor` at each step in `boundaries`), 'cosine' (decay to 0 at
    `total_steps`). Each starts with a linear warm-up from 0 to `base` over `warmup_steps`;
    the steps of `boundaries` and `total_steps` count from the run's start, warm-up included."""
    if kind in ("constant", "plateau", "step") and warmup_steps:
        after = make_schedule(kind, base, boundaries=boundaries, factor=factor)
        after = after if callable(after) else optax.constant_schedule(after)
        return optax.join_schedules([optax.linear_schedule(0.0, base, warmup_steps),
                                     lambda step: after(step + warmup_steps)], [warmup_steps])
    if kind in ("constant", "plateau"):
        return base
    if kind == "step":
        return optax.piecewise_constant_schedule(base, {int(b): factor for b in boundaries})
    if kind == "cosine":
        if total_steps <= warmup_steps:
            raise ValueError(f"cosine schedule: total_steps ({total_steps}) must exceed "
                             f"warmup_steps ({warmup_steps})")
        return optax.warmup_cosine_decay_schedule(0.0, base, warmup_steps, total_steps, 0.0)
    raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


class PlateauState(NamedTuple):
    """The paper's manual schedule, as data: best validation error so far, evaluations
    without improvement, drops done, and the current learning-rate multiplier."""

    best: float = float("inf")
    bad_evals: int = 0
    drops: int = 0
    scale: float = 1.0


def plateau_update(state: PlateauState, error: float, *, patience: int = 1, factor: float = 0.1,
                   max_drops: int = 3, min_delta: float = 0.0) -> PlateauState:
    """Divide the rate by 1/factor after `patience` evaluations without an improvement of
    more than `min_delta`, at most `max_drops` times (the paper: by 10, three times)."""
    best, bad, drops, scale = float(state.best), int(state.bad_evals), int(state.drops), float(state.scale)
    if error < best - min_delta:
        return PlateauState(error, 0, drops, scale)
    bad += 1
    if bad >= patience and drops < max_drops:
        return PlateauState(best, 0, drops + 1, scale * factor)
    return PlateauState(best, bad, drops, scale)
