"""Sharding rules: the one place where logical axes meet mesh axes.

The mesh is (SP, TP) with axis names ("sp", "tp"); device (s, t) has global
rank s * TP + t. Attention heads and the KV cache are always split over both
axes in the order ("tp", "sp"), so head chunk t * SP + s lives on device (s, t)
in *both* step variants, and switching variants never moves the cache:

- TP variant (shift): every weight split P ways over ("tp", "sp"); tokens replicated.
- SP variant (Ulysses base): tokens split over "sp", weights split TP ways over
  "tp"; an all-to-all over "sp" turns token-split q/k/v into head-split q/k/v
  around attention, and a second one turns the result back.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding import logical_axes as ax

MeshAxes = str | tuple[str, ...] | None
ALL_DEVICES: tuple[str, str] = ("tp", "sp")

_COMMON: dict[str, MeshAxes] = {
    ax.ATTN_TOKENS: None,
    ax.ATTN_HEADS: ALL_DEVICES,
    ax.CACHE_HEADS: ALL_DEVICES,
    ax.EMBED: None, ax.HEAD_DIM: None, ax.KV_PAIR: None, ax.GATE_UP: None, ax.KV_GROUPS: None,
    ax.PAGES: None, ax.PAGE_SLOTS: None, ax.LOGITS_ROWS: None,
}

TP_RULES: dict[str, MeshAxes] = {
    **_COMMON,
    ax.TOKENS: None,
    ax.Q_HEADS: ALL_DEVICES, ax.KV_HEADS: ALL_DEVICES, ax.MLP: ALL_DEVICES,
    ax.VOCAB: ALL_DEVICES,
}

SP_RULES: dict[str, MeshAxes] = {
    **_COMMON,
    ax.TOKENS: "sp",
    ax.Q_HEADS: "tp", ax.KV_HEADS: "tp", ax.MLP: "tp",
    ax.VOCAB: "tp",
}

VARIANT_RULES: Mapping[str, Mapping[str, MeshAxes]] = {"tp": TP_RULES, "sp": SP_RULES}


def variant_rules(variant: str, split_vocab: bool = True) -> dict[str, MeshAxes]:
    """The rules of one step variant; ``split_vocab=False`` replicates the vocab axis."""
    rules = dict(VARIANT_RULES[variant])
    if not split_vocab:
        rules[ax.VOCAB] = None
    return rules


def partition_spec(axes: ax.LogicalAxes, rules: Mapping[str, MeshAxes]) -> PartitionSpec:
    """PartitionSpec of an array whose axes have these logical names."""
    missing = [a for a in axes if a is not None and a not in rules]
    if missing:
        raise KeyError(f"no sharding rule for logical axes {missing}")
    return PartitionSpec(*(None if a is None else rules[a] for a in axes))


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Constrains activations at the step's layout points (hashable: part of StepOptions)."""

    mesh: Mesh
    variant: str
    split_vocab: bool = True   # False when the vocabulary does not divide over the devices

    @property
    def rules(self) -> Mapping[str, MeshAxes]:
        return variant_rules(self.variant, self.split_vocab)

    def sharding(self, axes: ax.LogicalAxes) -> NamedSharding:
        return NamedSharding(self.mesh, partition_spec(axes, self.rules))

    def constrain(self, x: jax.Array, axes: ax.LogicalAxes) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.sharding(axes))


def constrain(sharding: ActivationSharding | None, x: jax.Array, axes: ax.LogicalAxes) -> jax.Array:
    """``x`` laid out as ``axes`` under ``sharding``; unchanged on a single device."""
    return x if sharding is None else sharding.constrain(x, axes)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """The one sharding of every K/V cache buffer, shared by both step variants."""
    return NamedSharding(mesh, partition_spec(ax.KV_CACHE_AXES, TP_RULES))


def dataclass_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, MeshAxes]) -> Any:
    """A pytree of NamedShardings for a weights pytree whose fields declare ``axes`` metadata."""
    if dataclasses.is_dataclass(tree):
        out = {}
        for f in dataclasses.fields(tree):
            value = getattr(tree, f.name)
            if value is None:
                out[f.name] = None
            elif "axes" in f.metadata:
                out[f.name] = NamedSharding(mesh, partition_spec(f.metadata["axes"], rules))
            else:
                out[f.name] = dataclass_shardings(value, mesh, rules)
        return dataclasses.replace(tree, **out)
    if isinstance(tree, (tuple, list)):
        return type(tree)(dataclass_shardings(v, mesh, rules) for v in tree)
    raise TypeError(f"cannot derive shardings for {type(tree).__name__}")
