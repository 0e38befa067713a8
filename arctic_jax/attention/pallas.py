"""The policy mapping a ``StepBatch`` onto the raw Pallas kernels of ``pallas_kernels``
(Triton lowering, and Mosaic GPU for prefill on Hopper).

``paged_attention_pallas`` has the contract of
``arctic_jax.attention.reference.reference_attention`` (q [T, N, D] of a ragged
``StepBatch``; output [T, N, D] in q's dtype) and picks a kernel statically:

- ``mode="prefill"``: ``ragged_prefill_attention`` over query_start / kv_lens.
  Correct for any batch (prefill, chunked prefill, decode, mixed), but a
  sequence with one new token still gets a whole query tile.
- ``mode="decode"``: ``paged_decode_attention`` with one row per token: token t
  attends to keys 0 .. positions[t] of sequence seq_ids[t]. Also correct for any
  batch, but a sequence with n tokens in the step has its KV read n times, so it
  is meant for decode steps (one token per sequence), where its split-K keeps
  the GPU busy at small batch and long context.
- ``mode="mixed"``: both, each on its share: sequences with exactly one new token
  go through the decode kernel (one row per sequence, so its split-K is sized by
  S), the others through the prefill kernel (which sees the one-token sequences
  as empty and only writes zeros for them); a gather and a select merge the two
  outputs. For steps that mix decodes with prefill chunks.
- ``mode="auto"`` (default): "decode" when T <= S (a decode-sized token bucket),
  else "mixed". All modes are correct for any batch; only speed differs.

Why "mixed" for T > S (H100, 32 q / 8 kv heads, 64 decodes at context 1,152 plus
one 448-token chunk, ps 16; benchmarks/attention.py --only mixed): with an fp8
cache 213 us against 286 for "prefill"; with bf16 192 against 182 (prefill
mode is 5% faster there) but 143 against 165 when the step holds only decodes.
End to end (arctic-jax bench, c=64, 1024 in / 256 out, same machine) "mixed"
gave 3,952 output tok/s against 3,886 with bf16 and 4,116 with fp8. (Those runs
gave the decode kernel all T token rows, the one-token sequences' live and the
rest empty; it now gets one row per sequence, which is not yet timed on a GPU.)

The prefill share runs on one of two kernels (``prefill_backend``):

- ``"mosaic"``: ``ragged_prefill_mgpu`` (Pallas Mosaic GPU: wgmma, TMA, warp roles).
  Hopper only, 16-bit q and cache of the same dtype, head_dim 64/128. H100,
  32 q / 8 kv heads, bf16 (benchmarks/RESULTS.md): 8k causal 452-458 TFLOP/s
  (cuDNN 486-497), 500-505 with a 4k cached prefix, 2k with a 4k prefix 438-451,
  against 310-314 / 342-343 / 299-302 for the Triton kernel in the same run.
- ``"triton"``: ``ragged_prefill`` (Triton lowering; interpret mode on CPU). Any
  dtype, including fp8 caches.
- ``"auto"`` (default): "mosaic" where it applies and the step has at least
  ``MOSAIC_MIN_TOKENS`` (2,048) tokens, else "triton". Smaller steps are mostly
  decode rows plus one chunk: serving the 8B at concurrency 64 with 512-token
  steps gave 3,920 output tok/s with the Triton prefill kernel against 3,812 with
  Mosaic GPU's (each short block costs a whole program with ~190 KiB of shared
  memory). Mixed steps of 2,048+ tokens are not timed end to end yet.

A batch with token trees (``batch.lookback``, speculative tree verification) runs in
"mixed" mode with the Triton prefill kernel, which applies the lookback bits: every
multi-token chunk goes through it, and one-token chunks (never trees) through the
decode kernel. Mosaic GPU and the decode kernel take no tree mask.

Tokens at or past query_start[S] (padding) get output 0, where the reference
returns an arbitrary finite value.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from arctic_jax.batch import StepBatch
from pallas_kernels import (
    DecodeConfig,
    MosaicPrefillConfig,
    PrefillConfig,
    is_hopper,
    paged_decode_attention,
    ragged_prefill_attention,
    ragged_prefill_attention_mgpu,
    unsupported_reason,
)

MODES = ("auto", "prefill", "decode", "mixed")
PREFILL_BACKENDS = ("auto", "triton", "mosaic")
MOSAIC_MIN_TOKENS = 2048   # smaller steps are mostly decode rows; see the module docstring

__all__ = ["MODES", "MOSAIC_MIN_TOKENS", "PREFILL_BACKENDS", "paged_attention_pallas", "select_mode",
           "select_prefill_backend"]


def select_mode(num_tokens: int, num_seqs: int, mode: str = "auto") -> str:
    """The kernel ``paged_attention_pallas`` uses for static T and S."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "auto":
        return "decode" if num_tokens <= num_seqs else "mixed"
    return mode


def select_prefill_backend(q_dtype, cache_dtype, head_dim: int, page_size: int, interpret: bool,
                           backend: str = "auto",
                           mosaic_config: MosaicPrefillConfig | None = None,
                           num_tokens: int | None = None) -> str:
    """The prefill kernel ``paged_attention_pallas`` uses: "mosaic" or "triton".

    "auto" takes Mosaic GPU only for steps of at least ``MOSAIC_MIN_TOKENS`` tokens
    (``num_tokens``; None: any step)."""
    if backend not in PREFILL_BACKENDS:
        raise ValueError(f"unknown prefill backend {backend!r}; choose one of {PREFILL_BACKENDS}")
    if backend == "triton":
        return backend
    if backend == "auto" and num_tokens is not None and num_tokens < MOSAIC_MIN_TOKENS:
        return "triton"
    reason = ("Mosaic GPU needs a Hopper GPU and has no public interpret mode"
              if interpret or not is_hopper()
              else unsupported_reason(q_dtype, cache_dtype, head_dim, page_size, mosaic_config))
    if reason is None:
        return "mosaic"
    if backend == "mosaic":
        raise ValueError(f"prefill_backend='mosaic' cannot run here: {reason}")
    return "triton"


def paged_attention_pallas(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           batch: StepBatch, scale: float, interpret: bool = False, *,
                           mode: str = "auto", decode_config: DecodeConfig | None = None,
                           prefill_config: PrefillConfig | None = None,
                           prefill_backend: str = "auto",
                           mosaic_config: MosaicPrefillConfig | None = None) -> jax.Array:
    """q [T, N, D] attends over the paged cache [K, P, PS, D] as the batch says; returns [T, N, D]."""
    T = q.shape[0]
    S = batch.page_tables.shape[0]
    mode = select_mode(T, S, mode)
    tree = batch.lookback is not None
    if tree:   # only the Triton prefill kernel applies lookback bits
        mode = "prefill" if mode == "prefill" else "mixed"
        prefill_backend = "triton"
    backend = select_prefill_backend(q.dtype, k_cache.dtype, q.shape[-1], k_cache.shape[2],
                                     interpret, prefill_backend, mosaic_config, num_tokens=T)
    if backend == "mosaic":
        # mixed mode overwrites the rows the prefill kernel sees as empty: skip them there
        prefill = functools.partial(ragged_prefill_attention_mgpu, q, k_cache, v_cache,
                                    batch.query_start, page_tables=batch.page_tables, scale=scale,
                                    config=mosaic_config, fill_empty=mode != "mixed")
    else:
        prefill = functools.partial(ragged_prefill_attention, q, k_cache, v_cache,
                                    batch.query_start, page_tables=batch.page_tables, scale=scale,
                                    config=prefill_config, interpret=interpret,
                                    lookback=batch.lookback)
    if mode == "prefill":
        return prefill(batch.kv_lens)
    live = jnp.arange(T, dtype=jnp.int32) < batch.query_start[S]
    if mode == "decode":
        return paged_decode_attention(q, k_cache, v_cache, batch.page_tables,
                                      jnp.where(live, batch.positions.astype(jnp.int32) + 1, 0),
                                      batch.seq_ids.astype(jnp.int32), scale=scale,
                                      config=decode_config, interpret=interpret)
    # mixed: one decode row per sequence (its first token), live only for one-token sequences
    seq = jnp.clip(batch.seq_ids.astype(jnp.int32), 0, S - 1)                       # [T]
    single = (batch.query_start[1:] - batch.query_start[:-1]) == 1                  # [S]
    first = jnp.clip(batch.query_start[:-1], 0, T - 1)                              # [S]
    dec = paged_decode_attention(q[first], k_cache, v_cache, batch.page_tables,
                                 jnp.where(single, batch.kv_lens, 0).astype(jnp.int32),
                                 scale=scale, config=decode_config, interpret=interpret)
    pre = prefill(jnp.where(single, 0, batch.kv_lens))
    by_decode = live & single[seq]                                                  # [T]
    # padding rows get 0 here: the Mosaic kernel leaves them unwritten in mixed mode
    return jnp.where(by_decode[:, None, None], dec[seq], jnp.where(live[:, None, None], pre, 0))
