"""Helpers shared by the Pallas attention kernels (Triton lowering on GPU, interpret mode on CPU).

Triton constraints the kernels respect: every loaded/stored tile has a power-of-2
number of elements, and a dot needs M, N, K >= 16. Refs are raw pointers on the
GPU, so nothing outside an array may be read: indices are clamped instead.

K/V tiles are gathered per key: key position -> page-table entry -> slot
(page * PS + offset) -> row of the cache viewed as [K, P * PS, D]. So a tile of
``block_k`` keys may span several pages or part of one, for any page size.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
# Masked scores are -inf; the running max starts finite, so exp2(score - max) is
# exactly 0 for masked keys and a row that sees no key at all keeps sum 0 (output 0).
NEG_INF = float("-inf")
M_INIT = -1e30


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv_static(a: int, b: int) -> int:
    return -(-a // b)


def cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceil division of a traced non-negative int32 by a static positive int."""
    return lax.div(a + (b - 1), jnp.int32(b))


def triton_compiler_params(num_warps: int | None, num_stages: int | None) -> Any:
    """Triton compiler params; passing them also selects the Triton (not Mosaic GPU) lowering."""
    from jax.experimental.pallas import triton as pltriton
    cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams", None)
    if cls is None:
        raise RuntimeError("this jax has no Pallas Triton CompilerParams; the kernels need the "
                           "Triton lowering (jax.experimental.pallas.triton)")
    return cls(num_warps=num_warps, num_stages=num_stages)


def masked_store(ref_view: Any, value: jax.Array, mask: jax.Array) -> None:
    """Store ``value`` into a ref view (``ref.at[...]``) where ``mask`` is true."""
    from jax.experimental.pallas import triton as pltriton
    store = getattr(pltriton, "store", None)
    if store is None:
        raise RuntimeError("jax.experimental.pallas.triton.store is missing in this jax version")
    store(ref_view, value, mask=mask)


def _precision(dtype: Any) -> Any:
    # Triton maps DEFAULT precision of f32 operands to TF32; ask for IEEE f32 instead.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, D] @ b[N, D].T -> [M, N] in f32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] @ b [K, N] -> [M, N] in f32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def online_softmax_step(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                        scale_log2: float, carry: tuple[jax.Array, jax.Array, jax.Array]
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One flash-attention step in base 2.

    q [R, D], k/v [BK, D], mask [R, BK] or [1, BK] (None: no mask); carry is
    (running max m [R], running sum l [R], unnormalised output acc [R, D] f32),
    with m in scaled log2 units. The scale is applied inside the exponent
    (one FMA per score): on the H100 8k prefill with a 4k prefix this gave
    344 / 346 TFLOP/s (page size 16 / 64) against 337 / 339 when scaling the scores
    first. Two other variants measured slower and were dropped: rescaling acc
    only when a row max grows past a slack (a block-wide lax.cond per step, -4%)
    and f16 exponentials (-6%).
    """
    m_prev, l_prev, acc_prev = carry
    if k.dtype != q.dtype:          # e.g. f32 queries over a bf16 cache: compute in q's dtype
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    s = dot_nt(q, k)                # raw scores
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1) * scale_log2)
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s * scale_log2 - m_new[:, None])
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc_prev * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
    return m_new, l_new, acc


def init_carry(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (jnp.full((rows,), M_INIT, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))


def normalise(l: jax.Array, acc: jax.Array) -> jax.Array:
    """acc / l per row; rows that saw no key (l == 0) give 0."""
    inv = jnp.where(l > 0, 1.0 / l, 0.0)
    return acc * inv[:, None]


def check_cache(k_cache: jax.Array, v_cache: jax.Array) -> tuple[int, int, int, int]:
    """Validates K/V caches [K, P, PS, D]; returns (K, P, PS, D)."""
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v caches must both be [kv_heads, pages, page_size, head_dim]; got "
                         f"{k_cache.shape} and {v_cache.shape}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k/v cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    kh, pages, page_size, d = k_cache.shape
    if not is_pow2(d) or d < 16:
        raise ValueError(f"head_dim must be a power of 2 >= 16 for the Triton kernels, got {d}")
    return kh, pages, page_size, d


def check_block(name: str, value: int, minimum: int = 1) -> int:
    if not is_pow2(value) or value < minimum:
        raise ValueError(f"{name} must be a power of 2 >= {minimum}, got {value}")
    return value


def check_query(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                axis_name: str) -> tuple[int, int, int, int, int]:
    """Check q [rows, N, D] against the cache: (kv heads, pages, page size, D, rows, N)."""
    kh, num_pages, page_size, d = check_cache(k_cache, v_cache)
    if q.ndim != 3 or q.shape[2] != d:
        raise ValueError(f"q must be [{axis_name}, N, {d}], got {q.shape}")
    rows, n, _ = q.shape
    if n % kh:
        raise ValueError(f"query heads {n} are not a multiple of kv heads {kh}")
    return kh, num_pages, page_size, d, rows, n


def check_int_vector(x: jax.Array, n: int, name: str) -> jax.Array:
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {x.dtype}")
    return x.astype(jnp.int32)


def check_page_tables(page_tables: jax.Array) -> jax.Array:
    if page_tables.ndim != 2:
        raise ValueError(f"page_tables must be [rows, max_pages], got {page_tables.shape}")
    if not jnp.issubdtype(page_tables.dtype, jnp.integer):
        raise ValueError(f"page_tables must be integer, got {page_tables.dtype}")
    return page_tables.astype(jnp.int32)


def check_ragged(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, query_start: jax.Array,
                 kv_lens: jax.Array, page_tables: jax.Array):
    """Checks a ragged prefill call: returns (K, P, PS, D, T, N) and int32 page_tables [S, MP],
    kv_lens [S], query_start [S + 1]."""
    dims = check_query(q, k_cache, v_cache, "T")
    pt = check_page_tables(page_tables)
    S = pt.shape[0]
    return (dims, pt, check_int_vector(kv_lens, S, "kv_lens"),
            check_int_vector(query_start, S + 1, "query_start"))


def flat_slots(cache: jax.Array) -> jax.Array:
    """[K, P, PS, D] -> [K, P * PS, D] (a free reshape): one row per KV slot."""
    kh, pages, page_size, d = cache.shape
    return cache.reshape(kh, pages * page_size, d)


def kv_tile(k_ref: Any, v_ref: Any, pt_ref: Any, row: jax.Array, tok0: jax.Array, block_k: int,
            page_size: int, n_tokens: jax.Array, num_slots: int
            ) -> tuple[jax.Array, jax.Array]:
    """K and V [block_k, D] of key positions tok0 .. tok0+block_k-1 of page-table row ``row``.

    k_ref/v_ref are one KV head's slots [P * PS, D]; pt_ref the page tables [rows, MP].
    Each key's page is looked up on its own (so a tile may span any number of
    pages, or part of one). Keys at or past n_tokens read slot 0; callers mask them.
    When page_size % block_k == 0 the tile is one contiguous load from tok0's page;
    callers must then pass tok0 as a multiple of block_k (both kernels do), so the
    tile lies inside that page. Keys past n_tokens then read the rest of the page,
    also masked by the callers.
    """
    if page_size % block_k == 0:    # the tile lies inside one page: one contiguous load
        page = pt_ref[row, lax.div(tok0, jnp.int32(page_size))]
        start = page * page_size + lax.rem(tok0, jnp.int32(page_size))
        start = jnp.clip(start, 0, num_slots - block_k)
        return k_ref[pl.ds(start, block_k)], v_ref[pl.ds(start, block_k)]
    tok = tok0 + jnp.arange(block_k, dtype=jnp.int32)
    live = tok < n_tokens
    tok = jnp.where(live, tok, 0)
    page = pt_ref[row, lax.div(tok, jnp.int32(page_size))]
    slot = page * page_size + lax.rem(tok, jnp.int32(page_size))
    slot = jnp.where(live, jnp.clip(slot, 0, num_slots - 1), 0)
    return k_ref[slot], v_ref[slot]
