"""Model registry: every architecture variant is a registered name, not a copy.

    model = get_model("alexnet", num_classes=10, init_scheme="lecun")
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models.spec import ModelSpec, TorchLayout, spec_of

__all__ = ["register", "list_models", "get_model", "model_defaults", "variant_fields", "abstract_variables",
           "ModelSpec", "TorchLayout", "spec_of"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES = ("alexnet", "alexnet_towers", "lenet", "vgg", "googlenet", "resnet", "torchvision", "convnet")


def register(name: str):
    """Registers a module class or factory under `name` (decorator). The class declares its
    `spec` (a `ModelSpec`): what training, transfer and the weight importer may know of it."""

    def add(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        if not isinstance(getattr(getattr(factory, "func", factory), "spec", None), ModelSpec):
            raise TypeError(f"model {name!r}: its class must declare spec = ModelSpec(head=...)")
        _REGISTRY[name] = factory
        return factory

    return add


def _load_families():
    for family in _FAMILIES:
        importlib.import_module(f"{__name__}.{family}")


def list_models() -> list[str]:
    """Names accepted by `get_model`, sorted."""
    _load_families()
    return sorted(_REGISTRY)


def _fields(factory) -> set[str]:
    cls = getattr(factory, "func", factory)  # functools.partial of a module class
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def variant_fields(name: str) -> dict:
    """The field values that make the registered name a variant of its class (resnet20_cifar's
    `shortcut='A'`, googlenet_no_aux's `aux_heads=False`); {} for a class registered as is."""
    _load_families()
    return dict(getattr(_REGISTRY[name], "keywords", None) or {})


def model_defaults(name: str) -> dict:
    """{field: default} of the registered model `name`, its variant's values included, without
    num_classes: what a command line may set."""
    _load_families()
    factory = _REGISTRY[name]
    variant = variant_fields(name)
    return {f.name: variant.get(f.name, f.default) for f in dataclasses.fields(getattr(factory, "func", factory))
            if f.name not in ("parent", "name", "num_classes")}


def get_model(name: str, **overrides) -> nn.Module:
    """Builds the registered model `name`, with dataclass fields replaced by `overrides`.

    Unknown names and unknown fields are errors that list what is accepted.
    """
    _load_families()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    unknown = set(overrides) - _fields(factory)
    if unknown:
        raise ValueError(f"model {name!r} has no field(s) {sorted(unknown)}; "
                         f"its fields are {sorted(_fields(factory))}")
    return factory(**overrides)


@functools.lru_cache(maxsize=64)
def abstract_variables(model: nn.Module, size: int | None = None, channels: int | None = None) -> dict:
    """The model's variables as shapes, traced at a (size, size, channels) input (default: the
    model's own `input_shape`); nothing is computed, and each (model, input) is traced once.
    A size the model's geometry does not allow raises its `GeometryError`."""
    shape = tuple(model.input_shape) if size is None else (size, size, channels)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *shape), jnp.float32))
