"""Names of places in a tree of arrays, the one spelling every module matches and prints."""

from __future__ import annotations


def path_name(keypath) -> str:
    """'params/conv1/kernel' for a jax key path (dict keys, attribute names, sequence indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)
