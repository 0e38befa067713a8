"""Bidirectional attention within each sequence of a packed encoder batch.

Token t attends to every token of its own sequence (``batch.segment_ids``), before or after
it, and to nothing else. Shapes: q, k, v [T, N, D] -> [T, N, D] in q's dtype; padding rows
(segment id S) are 0.

- ``"reference"``: a dense [N, T, T] segment mask in jnp (O(T^2) memory; tests and CPU).
- ``"pallas"``: ``pallas_kernels.segment_attention`` (interpreted off the GPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from arctic_jax.encoder_batch import EncoderBatch
from pallas_kernels.segment_attention import segment_attention_pallas, supports_head_dim

SEGMENT_ATTENTION_IMPLS = ("reference", "pallas")

_MASKED = -1e30  # finite, so a fully masked row stays finite


def pallas_supports(head_dim: int) -> bool:
    """Whether the "pallas" implementation takes heads of ``head_dim``."""
    return supports_head_dim(head_dim)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, batch: EncoderBatch, *,
                      scale: float, impl: str = "reference") -> jax.Array:
    """Attention of each token over its own sequence (see the module docstring)."""
    if impl == "reference":
        return reference_segment_attention(q, k, v, batch.segment_ids, batch.num_seq_slots,
                                           scale=scale)
    if impl == "pallas":
        return segment_attention_pallas(q, k, v, batch.seq_start, batch.segment_ids, scale=scale,
                                        interpret=jax.default_backend() != "gpu")
    raise ValueError(f"unknown segment attention impl {impl!r}; "
                     f"supported: {', '.join(SEGMENT_ATTENTION_IMPLS)}")


def reference_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                                segment_ids: jax.Array, num_seqs: int, *, scale: float
                                ) -> jax.Array:
    """Dense segment-masked softmax attention; tokens with segment id >= ``num_seqs``
    (padding) get 0."""
    scores = jnp.einsum("tnd,und->ntu", q, k, preferred_element_type=jnp.float32) * scale
    same = segment_ids[:, None] == segment_ids[None, :]
    scores = jnp.where(same[None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("ntu,und->tnd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    real = (segment_ids < num_seqs)[:, None, None]
    return jnp.where(real, out, 0.0).astype(q.dtype)
