"""Attention over the paged KV cache, behind one ``attention_impl`` switch, and the routes
(strategies) a model step calls."""
from arctic_jax.attention.dispatch import (
    ATTENTION_IMPLS,
    PALLAS_IMPLS,
    contiguous_causal_attention,
    paged_attention,
)
from arctic_jax.attention.strategy import AttentionStrategy, ContiguousCausalAttention, PagedAttention

__all__ = ["ATTENTION_IMPLS", "PALLAS_IMPLS", "AttentionStrategy", "ContiguousCausalAttention",
           "PagedAttention", "contiguous_causal_attention", "paged_attention"]
