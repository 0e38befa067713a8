"""Pallas attention kernels over a paged KV cache, on raw arrays (Triton lowering, and Mosaic GPU for
prefill on Hopper): a split-K paged decode kernel, a ragged prefill kernel, and a Mosaic GPU ragged
prefill kernel, each with a plain-jnp reference.

This package imports nothing from ``arctic_jax``; the policy mapping a ``StepBatch`` onto these
kernels is ``arctic_jax.attention.pallas``.
"""
from __future__ import annotations

from pallas_kernels.paged_decode import (
    DecodeConfig,
    default_num_splits,
    paged_decode_attention,
    paged_decode_reference,
)
from pallas_kernels.ragged_prefill import (
    PrefillConfig,
    block_schedule,
    ragged_prefill_attention,
    ragged_prefill_reference,
)

# The Mosaic GPU kernel's names load on first use: importing jax's Mosaic GPU support takes a
# third of a second, which every CPU process (and every import of a sibling kernel) would pay.
_MOSAIC_NAMES = ("MosaicPrefillConfig", "is_hopper", "ragged_prefill_attention_mgpu",
                 "unsupported_reason")


def __getattr__(name: str):
    if name in _MOSAIC_NAMES:
        from pallas_kernels import ragged_prefill_mgpu
        return getattr(ragged_prefill_mgpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DecodeConfig", "MosaicPrefillConfig", "PrefillConfig", "block_schedule", "default_num_splits",
    "is_hopper", "paged_decode_attention", "paged_decode_reference", "ragged_prefill_attention",
    "ragged_prefill_attention_mgpu", "ragged_prefill_reference", "unsupported_reason",
]
