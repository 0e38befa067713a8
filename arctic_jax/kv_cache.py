"""The paged KV cache: per layer, K and V of shape [kv_heads, num_pages, page_size, head_dim].

Its logical axes are ``sharding.logical_axes.KV_CACHE_AXES``; every parallel
step variant shares that one layout.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.config import ModelConfig
from arctic_jax.pytree import pytree_dataclass, static_field


@pytree_dataclass
class KVCache:
    k: tuple[jax.Array, ...]   # per layer [K, P, S, D]
    v: tuple[jax.Array, ...]
    page_size: int = static_field()

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    @classmethod
    def allocate(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any,
                 num_kv_heads: int | None = None) -> KVCache:
        """A cache of ``num_pages`` pages per cache layer, filled with zeros."""
        shape = (num_kv_heads or cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_cache_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_cache_layers)),
                   page_size=page_size)


def bytes_per_page(cfg: ModelConfig, page_size: int, dtype: Any) -> int:
    """Device bytes of one page across all cache layers, K and V."""
    return (2 * cfg.num_cache_layers * cfg.num_kv_heads * page_size * cfg.head_dim
            * jnp.dtype(dtype).itemsize)


def to_cache_dtype(x: jax.Array, dtype: Any) -> jax.Array:
    """Cast K/V to the cache dtype; 8-bit floats saturate at their largest finite value
    (float8_e4m3fn has no infinity: an overflowing cast would give nan)."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
        big = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -big, big)
    return x.astype(dtype)


def write_kv(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new k, v [T, K, D] into their slots; slot < 0 (padding) writes nothing.

    The slot of token t is ``page * page_size + offset``. The update is in place
    when the cache buffers are donated.
    """
    kh, pages, page_size, d = cache_k.shape
    num_slots = pages * page_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def scatter(cache: jax.Array, new: jax.Array) -> jax.Array:
        flat = cache.reshape(kh, num_slots, d)
        flat = flat.at[:, slots].set(to_cache_dtype(jnp.swapaxes(new, 0, 1), cache.dtype),
                                     mode="drop")
        return flat.reshape(kh, pages, page_size, d)

    return scatter(cache_k, k), scatter(cache_v, v)
