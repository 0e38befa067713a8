"""Pallas (Triton lowering) attention kernels over the paged KV cache.

``paged_attention_pallas`` has the contract of
``arctic_jax.attention.reference.reference_attention`` (q [T, N, D] of a ragged
``StepBatch``; output [T, N, D] in q's dtype) and picks a kernel statically:

- ``mode="prefill"``: ``ragged_prefill_attention`` over query_start / kv_lens.
  Correct for any batch (prefill, chunked prefill, decode, mixed).
- ``mode="decode"``: ``paged_decode_attention`` with one row per token: token t
  attends to keys 0 .. positions[t] of sequence seq_ids[t]. Also correct for any
  batch, but a sequence with n tokens in the step has its KV read n times, so it
  is meant for decode steps (one token per sequence), where its split-K keeps
  the GPU busy at small batch and long context.
- ``mode="auto"`` (default): "decode" when T <= S (a decode-sized token bucket),
  else "prefill". Both kernels are correct either way; only speed differs.

Tokens at or past query_start[S] (padding) get output 0, where the reference
returns an arbitrary finite value.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from arctic_jax.batch import StepBatch
from pallas_kernels.kv_write import InPlaceReport, compile_write_kv, write_in_place_report
from pallas_kernels.paged_decode import (DecodeConfig, default_num_splits, paged_decode_attention,
                                         paged_decode_reference)
from pallas_kernels.ragged_prefill import (PrefillConfig, block_schedule, ragged_prefill_attention,
                                           ragged_prefill_reference)

MODES = ("auto", "prefill", "decode")

__all__ = [
    "DecodeConfig", "PrefillConfig", "InPlaceReport", "MODES", "block_schedule",
    "compile_write_kv", "default_num_splits", "paged_attention_pallas", "paged_decode_attention",
    "paged_decode_reference", "ragged_prefill_attention", "ragged_prefill_reference",
    "select_mode", "write_in_place_report",
]


def select_mode(num_tokens: int, num_seqs: int, mode: str = "auto") -> str:
    """The kernel ``paged_attention_pallas`` uses for static T and S."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "auto":
        return "decode" if num_tokens <= num_seqs else "prefill"
    return mode


def paged_attention_pallas(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           batch: StepBatch, scale: float, interpret: bool = False, *,
                           mode: str = "auto", decode_config: DecodeConfig | None = None,
                           prefill_config: PrefillConfig | None = None) -> jax.Array:
    """q [T, N, D] attends over the paged cache [K, P, PS, D] as the batch says; returns [T, N, D]."""
    T = q.shape[0]
    S = batch.page_tables.shape[0]
    if select_mode(T, S, mode) == "prefill":
        return ragged_prefill_attention(q, k_cache, v_cache, batch.query_start, batch.kv_lens,
                                        batch.page_tables, scale=scale, config=prefill_config,
                                        interpret=interpret)
    live = jnp.arange(T, dtype=jnp.int32) < batch.query_start[S]
    lens = jnp.where(live, batch.positions.astype(jnp.int32) + 1, 0)
    return paged_decode_attention(q, k_cache, v_cache, batch.page_tables, lens,
                                  batch.seq_ids.astype(jnp.int32), scale=scale,
                                  config=decode_config, interpret=interpret)
