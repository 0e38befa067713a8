"""Placing attention heads on P devices.

Every device must hold the same number of q heads and of KV heads, with each
q head beside the KV head it reads. When ``kv_heads`` does not divide into P
pieces, each KV head is replicated r = P / gcd(K, P) times (K' = K * r, a
multiple of P). Its G = N / K q heads are dealt to its r replicas; when G is
not a multiple of r, each replica gets ceil(G / r) q-head slots and the spare
slots are zero heads (zero q and o projections), which change no output.

    Llama-3.1-8B (N=32, K=8) on P=8: r = 1, nothing changes.
    SmolLM2 (N=9, K=3) on P=8: r = 8, K' = 24, one q slot per replica, N' = 24 (15 zero heads).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import jax.numpy as jnp
import numpy as np

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models.llama_weights import LayerWeights, LlamaWeights

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


def place_weights(weights: LlamaWeights, cfg: ModelConfig, plan: HeadPlacement) -> LlamaWeights:
    """Weights of ``placed_config``: KV heads repeated, q heads re-ordered and zero-padded."""
    if not plan.changes_model:
        return weights
    log.info("placing heads on %d devices: KV heads replicated x%d, %d zero query heads added",
             plan.num_devices, plan.kv_replication, plan.zero_heads)
    kv_src = tuple(k for k in range(cfg.num_kv_heads) for _ in range(plan.kv_replication))

    def layer(lw: LayerWeights) -> LayerWeights:
        return dataclasses.replace(
            lw,
            q_proj=_take_heads(lw.q_proj, 1, plan.q_source),
            o_proj=_take_heads(lw.o_proj, 0, plan.q_source),
            kv_proj=_take_heads(lw.kv_proj, 2, kv_src),
            q_bias=None if lw.q_bias is None else _take_heads(lw.q_bias, 0, plan.q_source),
            kv_bias=None if lw.kv_bias is None else _take_heads(lw.kv_bias, 1, kv_src),
        )

    return dataclasses.replace(weights, layers=tuple(layer(lw) for lw in weights.layers))
