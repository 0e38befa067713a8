"""Attention routes as hashable strategy objects: the runner picks one per program, the model
calls it.

Every route sees the step's queries and new keys/values *after* they were written into the
paged cache, so a route only decides where attention reads its keys from:

- ``PagedAttention``: every query attends over its sequence's pages (any step).
- ``ContiguousCausalAttention``: a fresh prompt's first chunk (one sequence from position
  0, then padding) attends causally over the step's own K/V (cuDNN on a GPU); it never
  reads the cache.

A strategy is part of the step's static options (it is a frozen dataclass), so each route
is its own compiled program and the model holds no branch on it.
"""
from __future__ import annotations

import dataclasses

import jax

from arctic_jax.attention.dispatch import check_attention_impl, contiguous_causal_attention, paged_attention
from arctic_jax.batch import StepBatch
from sharding.rules import ActivationSharding


@dataclasses.dataclass(frozen=True)
class _Route:
    """A route's implementation name (``attention_impl``), checked when it is made."""

    impl: str = "reference"

    def __post_init__(self) -> None:
        check_attention_impl(self.impl)


@dataclasses.dataclass(frozen=True)
class PagedAttention(_Route):
    """Queries attend over the paged cache as the batch's page tables say."""

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array,
                 cache_v: jax.Array, batch: StepBatch, *, scale: float,
                 sharding: ActivationSharding | None) -> jax.Array:
        """q [T, N, D], new k/v [T, K, D], caches [K, P, PS, D] (already holding k/v) -> [T, N, D]."""
        return paged_attention(q, cache_k, cache_v, batch, scale=scale, impl=self.impl,
                               sharding=sharding)


@dataclasses.dataclass(frozen=True)
class ContiguousCausalAttention(_Route):
    """One fresh sequence's first chunk: causal attention over the step's own K/V (the caches
    are not read: q [T, N, D] over k/v [T, K, D] -> [T, N, D])."""

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array,
                 cache_v: jax.Array, batch: StepBatch, *, scale: float,
                 sharding: ActivationSharding | None) -> jax.Array:
        return contiguous_causal_attention(q, k, v, scale=scale, impl=self.impl, sharding=sharding)


AttentionStrategy = PagedAttention | ContiguousCausalAttention
