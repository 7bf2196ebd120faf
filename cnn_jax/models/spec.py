"""What the rest of the library may know about a model, declared once on its class.

Training, transfer, the mesh and the weight importer read a model through its `spec` and
nothing else: which layers form the head (their shapes follow `num_classes`), how its
parameters split over the mesh's 'model' axis, and how torchvision names its layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """How torchvision names a model's layers. `prefix`: Flax module path -> state-dict prefix;
    `chw`: dense layers that read a (C, H, W) flattening, path -> C; `requires`: field values
    the model must have for the layout to apply (torchvision's ResNets: `shortcut='B'`)."""

    prefix: Callable[[tuple], str]
    chw: Mapping[tuple, int] = dataclasses.field(default_factory=dict)
    requires: Mapping[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """`head`: module paths of the layers whose shape follows `num_classes` (what transfer
    replaces and `head_only` trains). `partition_rules`: (regex on a parameter path,
    PartitionSpec) pairs splitting parameters over the 'model' axis, with `towers` devices on
    it (1: not split). `torchvision`: model -> its `TorchLayout`, or None where torchvision
    has no such network."""

    head: tuple[str, ...]
    partition_rules: tuple = ()
    towers: int = 1
    torchvision: Callable[[nn.Module], TorchLayout] | None = None


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec of a registered model (every registered class declares one)."""
    return type(model).spec
