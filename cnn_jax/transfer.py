"""Transfer learning: start from trained weights, give the model a new head, freeze by pattern.

    start = transfer.initial_variables("resnet18.pth", model, fresh)   # or another run's workdir
    print(start.describe())
    tx = optim.make_optimizer("paper_sgd", 0.01, frozen=transfer.all_but_head(model))

A model declares its `head`: the layers whose shape follows `num_classes` (`fc8` for AlexNet
and VGG, `fc` for ResNet, GoogLeNet's `fc` and its auxiliary heads' `fc2`). Weights for a
model with another class count keep everything but the head, which stays as initialised.
Freezing is an optax mask over parameter paths (`optim.make_optimizer(frozen=...)`): frozen
parameters get no update and no weight decay and have no optimiser state.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import numpy as np

from cnn_jax import weights
from cnn_jax.checkpoint import newest_step, restore_as_numpy, shapes
from cnn_jax.config import SettingError, literal
from cnn_jax.models import spec_of


class TransferError(SettingError):
    """Weights that cannot start this model; the message is one line."""


def head_of(model) -> tuple[str, ...]:
    """The model's head: the module paths of the layers that follow `num_classes`."""
    return spec_of(model).head


def all_but_head(model) -> str:
    """A regular expression for every parameter path outside the model's head."""
    head = head_of(model)
    if not head:
        raise TransferError(f"{type(model).__name__} declares no head: freeze with an explicit pattern")
    return r"^(?!(?:" + "|".join(re.escape(h) for h in head) + r")/)"


def patterns(model, config) -> dict:
    """`optim.make_optimizer`'s `frozen`, `slow` and `slow_lr_scale` for a run's `freeze`,
    `head_only` (freeze all but the head) and `backbone_lr_scale` (!= 1: slow all but the head)."""
    frozen = "|".join(f"(?:{p})" for p in (config.freeze, all_but_head(model) if config.head_only else "") if p)
    slow = all_but_head(model) if config.backbone_lr_scale != 1.0 else ""
    return {"frozen": frozen, "slow": slow, "slow_lr_scale": config.backbone_lr_scale}


def describe_training(params, frozen: str, slow: str = "", slow_lr_scale: float = 1.0) -> str:
    """'frozen: 14 of 16 parameter arrays (58,000,000 of 62,000,000 values) in 7 layer(s):
    conv1, ...' and the same for the slowed ones. `TransferError` for a pattern that matches
    nothing (a typo would freeze nothing) and for one that leaves nothing to train."""
    from cnn_jax import optim

    labels = jax.tree.leaves(optim.parameter_labels(frozen, slow)(params))
    sizes = [int(np.prod(np.shape(p))) for p in jax.tree.leaves(params)]
    names = list(shapes(params))
    lines = []
    for label, pattern, what in (("frozen", frozen, "frozen"), ("slow", slow, f"at {slow_lr_scale:g} x the rate")):
        if not pattern:
            continue
        hit = [i for i, lab in enumerate(labels) if lab == label]
        if not hit:
            raise TransferError(f"the pattern {literal(repr(pattern))} matches no parameter; paths look like "
                                f"{', '.join(names[:3])}")
        layers = sorted({_layer(names[i]) for i in hit})
        lines.append(f"{what}: {len(hit)} of {len(labels)} parameter arrays ({sum(sizes[i] for i in hit):,} of "
                     f"{sum(sizes):,} values) in {len(layers)} layer(s): {', '.join(layers[:6])}"
                     f"{', ...' if len(layers) > 6 else ''}")
    if labels and all(lab == "frozen" for lab in labels):
        raise TransferError("every parameter is frozen (the head has none, or the pattern covers it): nothing "
                            "would train; freeze less")
    return "\n".join(lines)


@dataclasses.dataclass
class Start:
    """Initial variables and what happened to them: layers loaded from `source`, layers left
    as initialised (the head, for a new class count)."""

    variables: dict
    source: str
    loaded: list[str]
    replaced: list[str]

    def describe(self) -> str:
        text = f"initialised from {self.source}: {len(self.loaded)} layer(s) loaded"
        if self.replaced:
            text += f"; replaced (new, as initialised): {', '.join(self.replaced)}"
        return text


def _layer(path: str) -> str:
    return path.rsplit("/", 1)[0]


def merge(fresh: dict, loaded: dict, head: tuple[str, ...], source: str, new_head: bool = False) -> Start:
    """`fresh` with every leaf taken from `loaded`, except head layers that `loaded` lacks or
    holds in another shape (or all of them, `new_head`: other classes, as many of them).
    Any other difference is a `TransferError` naming the parameter."""
    out, took, replaced = {}, set(), set()
    for collection, tree in fresh.items():
        have, want = shapes(loaded.get(collection, {})), shapes(tree)
        extra = sorted(p for p in have if p not in want and not weights.under(p, head))
        if extra:
            raise TransferError(f"{source} has {collection} this model lacks: {', '.join(extra[:3])}"
                                f"{' ...' if len(extra) > 3 else ''} ({len(extra)}); is it for another network?")
        flat, treedef = jax.tree_util.tree_flatten(tree)
        leaves = []
        for path, leaf in zip(want, flat):
            if path in have and have[path] == want[path] and not (new_head and weights.under(path, head)):
                leaves.append(np.asarray(weights.subtree(loaded[collection], path.split("/")), np.asarray(leaf).dtype))
                took.add(_layer(path))
            elif weights.under(path, head):
                leaves.append(leaf)
                replaced.add(_layer(path))
            elif path in have:
                raise TransferError(f"{collection} {path} has shape {have[path]} in {source} but the model needs "
                                    f"{want[path]}: build the model with the sizes it was trained with")
            else:
                raise TransferError(f"{source} lacks {collection} {path}: is it for another network?")
        out[collection] = jax.tree_util.tree_unflatten(treedef, leaves)
    return Start(out, source, sorted(took - replaced), sorted(replaced))


def checkpoint_of(location) -> pathlib.Path:
    """The newest checkpoint of a run's workdir (or checkpoints/, or checkpoints/<step>)."""
    try:
        return newest_step(location)
    except FileNotFoundError:
        raise TransferError("no checkpoint there; give a run's workdir, its checkpoints/<step>, or a "
                            "weights file", key="init_from", value=str(location)) from None


def workdir_variables(location) -> tuple[dict, str]:
    """({'params', 'batch_stats'} of the newest checkpoint of a run, its path)."""
    step = checkpoint_of(location)
    try:
        state = restore_as_numpy((step / "state").absolute())
    except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds on damage
        raise TransferError(f"cannot read {step} ({type(err).__name__}); it may be damaged: point at "
                            "another step, checkpoints/<step>", key="init_from", value=str(location)) from None
    return {c: state[c] for c in ("params", "batch_stats") if state.get(c)}, str(step)


def initial_variables(source, model, fresh: dict, new_head: bool = False) -> Start:
    """Variables for `model` from `source` (a PyTorch-format weights file, or a run's workdir
    or checkpoint), its head replaced where the class count differs, or always (`new_head`);
    `fresh` supplies the replaced layers and the structure."""
    location = pathlib.Path(source)
    fresh = jax.device_get(fresh)
    if location.is_dir():
        loaded, name = workdir_variables(location)
    else:
        try:
            loaded = weights.load(location, model, replace=head_of(model))
        except weights.WeightsError as err:
            raise TransferError(err.text, *err.settings, key="init_from", value=str(source)) from None
        name = str(location)
    return merge(fresh, loaded, head_of(model), name, new_head)


def start_state(state, source, model, new_head: bool = False):
    """A fresh train state (canonical layout, any devices) with the parameters and batch
    statistics of `source`, and what happened to them."""
    host = jax.device_get(state)
    start = initial_variables(source, model, {"params": host.params, "batch_stats": host.batch_stats}, new_head)
    return host.replace(params=start.variables["params"],
                        batch_stats=start.variables.get("batch_stats", host.batch_stats)), start
