"""Attention over the paged KV cache, behind one ``attention_impl`` switch."""
from arctic_jax.attention.dispatch import ATTENTION_IMPLS, paged_attention  # noqa: F401
