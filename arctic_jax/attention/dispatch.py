"""Selects the paged-attention implementation by name."""
from __future__ import annotations

import jax

from arctic_jax.attention.reference import reference_attention
from arctic_jax.batch import StepBatch

ATTENTION_IMPLS = ("reference",)


def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: StepBatch,
                    scale: float, impl: str = "reference") -> jax.Array:
    """q [T, N, D] attends over the paged cache [K, P, PS, D]; returns [T, N, D]."""
    if impl == "reference":
        return reference_attention(q, k_cache, v_cache, batch, scale)
    raise ValueError(f"unknown attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")
