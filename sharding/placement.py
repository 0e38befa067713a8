"""Placing attention heads on P devices.

Every device must hold the same number of q heads and of KV heads, with each
q head beside the KV head it reads. When ``kv_heads`` does not divide into P
pieces, each KV head is replicated r = P / gcd(K, P) times (K' = K * r, a
multiple of P). Its G = N / K q heads are dealt to its r replicas; when G is
not a multiple of r, each replica gets ceil(G / r) q-head slots and the spare
slots are zero heads (zero q and o projections), which change no output.

    Llama-3.1-8B (N=32, K=8) on P=8: r = 1, nothing changes.
    SmolLM2 (N=9, K=3) on P=8: r = 8, K' = 24, one q slot per replica, N' = 24 (15 zero heads).

``place_weights`` works on any weights dataclass pytree through the logical
axes its fields declare (``axes`` metadata, as ``sharding.rules`` reads them):
it knows no model.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np

from arctic_jax.config import ConfigError, ModelConfig
from sharding import logical_axes as ax

W = TypeVar("W")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HeadPlacement:
    num_devices: int
    kv_replication: int       # r
    q_slots_per_kv: int       # q heads per replicated KV head, padding included
    q_source: tuple[int, ...]  # for each new q head, the original q head, or -1 for a zero head

    @property
    def changes_model(self) -> bool:
        return self.kv_replication > 1 or -1 in self.q_source

    @property
    def zero_heads(self) -> int:
        return self.q_source.count(-1)


def plan_heads(cfg: ModelConfig, num_devices: int, allow_padding: bool = True) -> HeadPlacement:
    """How to replicate KV heads and pad q heads so both split evenly over ``num_devices``."""
    P, N, K = num_devices, cfg.num_heads, cfg.num_kv_heads
    if P < 1:
        raise ConfigError(f"need at least one device, got {P}")
    G = N // K
    r = P // math.gcd(K, P)
    slots = -(-G // r)
    if slots * r != G and not allow_padding:
        raise ConfigError(
            f"cannot place {N} query heads / {K} KV heads on {P} devices without zero-padding "
            f"query heads (each of the {K} KV heads would need {r} replicas sharing {G} query heads)")
    q_source = []
    for k in range(K):
        heads = list(range(k * G, (k + 1) * G))
        for replica in range(r):
            mine = heads[replica * slots:(replica + 1) * slots]
            q_source.extend(mine + [-1] * (slots - len(mine)))
    return HeadPlacement(num_devices=P, kv_replication=r, q_slots_per_kv=slots,
                         q_source=tuple(q_source))


def placed_config(cfg: ModelConfig, plan: HeadPlacement) -> ModelConfig:
    """The config the sharded step computes with (more, possibly zero, heads)."""
    return dataclasses.replace(cfg, num_heads=len(plan.q_source),
                               num_kv_heads=cfg.num_kv_heads * plan.kv_replication)


def _take_heads(w, axis: int, source: tuple[int, ...]):
    """Select heads along ``axis`` by ``source`` (-1: a zero head)."""
    idx = np.asarray([max(s, 0) for s in source])
    out = jnp.take(w, idx, axis=axis)
    mask_shape = [1] * w.ndim
    mask_shape[axis] = len(source)
    mask = jnp.asarray(np.asarray([s >= 0 for s in source]).reshape(mask_shape), w.dtype)
    return out * mask


_Sources = dict[str, tuple[int, tuple[int, ...]]]   # logical axis -> (heads before, source)


def _place_array(w: Any, axes: tuple[str | None, ...], name: str, sources: _Sources) -> Any:
    """``w`` with every head axis (Q_HEADS, KV_HEADS) taken from its ``sources``."""
    if w.ndim != len(axes):
        raise ValueError(f"{name}: {w.ndim} dimensions, but its field declares axes {axes}")
    for logical, (heads, source) in sources.items():
        for axis in (i for i, a in enumerate(axes) if a == logical):
            if w.shape[axis] != heads:
                raise ValueError(f"{name}: {logical} axis {axis} of shape {tuple(w.shape)} has "
                                 f"{w.shape[axis]} heads, the config has {heads}")
            w = _take_heads(w, axis, source)
    return w


def _place_tree(tree: Any, name: str, sources: _Sources) -> Any:
    if dataclasses.is_dataclass(tree):
        changes = {}
        for f in dataclasses.fields(tree):
            value, where = getattr(tree, f.name), f"{name}.{f.name}"
            if value is None:
                continue
            if "axes" in f.metadata:
                changes[f.name] = _place_array(value, tuple(f.metadata["axes"]), where, sources)
            elif dataclasses.is_dataclass(value) or isinstance(value, tuple):
                changes[f.name] = _place_tree(value, where, sources)
        return dataclasses.replace(tree, **changes)
    if isinstance(tree, tuple):
        return tuple(_place_tree(v, f"{name}[{i}]", sources) for i, v in enumerate(tree))
    raise TypeError(f"{name}: cannot place heads of a {type(tree).__name__} (expected a weights "
                    "dataclass or a tuple of them)")


def place_weights(weights: W, cfg: ModelConfig, plan: HeadPlacement) -> W:
    """Weights of ``placed_config``, for any weights dataclass pytree.

    Every array whose field declares a Q_HEADS axis has its q heads re-ordered and
    zero-padded by ``plan.q_source``; every array with a KV_HEADS axis has its KV heads
    replicated ``plan.kv_replication`` times. Tuple fields (layers) are placed element-wise;
    other arrays are unchanged.
    """
    if not plan.changes_model:
        return weights
    log.info("placing heads on %d devices: KV heads replicated x%d, %d zero query heads added",
             plan.num_devices, plan.kv_replication, plan.zero_heads)
    kv_src = tuple(k for k in range(cfg.num_kv_heads) for _ in range(plan.kv_replication))
    return _place_tree(weights, type(weights).__name__,
                       {ax.Q_HEADS: (cfg.num_heads, plan.q_source),
                        ax.KV_HEADS: (cfg.num_kv_heads, kv_src)})
