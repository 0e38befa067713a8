"""Helpers shared by the Pallas attention kernels (Triton lowering on GPU, interpret mode on CPU).

Triton constraints the kernels respect: every loaded/stored tile has a power-of-2
number of elements, and a dot needs M, N, K >= 16. Refs are raw pointers on the
GPU, so nothing outside an array may be read: callers pad or clamp instead.
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
    (running max m [R], running sum l [R], unnormalised output acc [R, D] f32).
    """
    m_prev, l_prev, acc_prev = carry
    s = dot_nt(q, k) * scale_log2
    if mask is not None:
        s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, None])
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
    if not is_pow2(page_size):
        raise ValueError(f"page_size must be a power of 2 for the Triton kernels, got {page_size}")
    if not is_pow2(d) or d < 16:
        raise ValueError(f"head_dim must be a power of 2 >= 16 for the Triton kernels, got {d}")
    return kh, pages, page_size, d


def check_int_vector(x: jax.Array, n: int, name: str) -> jax.Array:
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {x.dtype}")
    return x.astype(jnp.int32)


def pad_page_table(page_tables: jax.Array, multiple: int) -> jax.Array:
    """Pads page-table columns with page 0 to a multiple of ``multiple`` (never read past)."""
    if page_tables.ndim != 2:
        raise ValueError(f"page_tables must be [rows, max_pages], got {page_tables.shape}")
    if not jnp.issubdtype(page_tables.dtype, jnp.integer):
        raise ValueError(f"page_tables must be integer, got {page_tables.dtype}")
    mp = page_tables.shape[1]
    extra = cdiv_static(mp, multiple) * multiple - mp
    pt = page_tables.astype(jnp.int32)
    return jnp.pad(pt, ((0, 0), (0, extra))) if extra else pt


def pages_for_block(pt_ref: Any, row: jax.Array, col0: jax.Array, pages_per_block: int,
                    n_pages: jax.Array, num_pages: int) -> jax.Array:
    """Page ids of page-table columns col0 .. col0+ppb-1; columns past n_pages read page 0."""
    pages = pt_ref[row, pl.ds(col0, pages_per_block)]
    cols = col0 + jnp.arange(pages_per_block, dtype=jnp.int32)
    pages = jnp.where(cols < n_pages, pages, 0)
    return jnp.minimum(jnp.maximum(pages, 0), num_pages - 1)
