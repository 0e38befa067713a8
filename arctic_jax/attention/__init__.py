"""Attention over the paged KV cache, behind one ``attention_impl`` switch."""
from arctic_jax.attention.dispatch import (  # noqa: F401
    ATTENTION_IMPLS, PALLAS_IMPLS, contiguous_causal_attention, paged_attention)
