"""Frozen dataclasses registered as JAX pytrees.

Fields marked with ``static_field()`` are treated as compile-time metadata;
all other fields are pytree leaves (arrays, or nested pytrees).
"""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T")

_STATIC = "arctic_static"


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is part of the tree structure, not a leaf."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[_STATIC] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen dataclass and register it with JAX's tree utilities."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get(_STATIC)]
    meta = [f.name for f in fields if f.metadata.get(_STATIC)]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)


def tree_nbytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (unsharded sizes)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
