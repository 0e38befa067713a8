"""Pure-jnp attention over the paged KV cache (the reference implementation).

Token t of sequence s = seq_ids[t] attends to cache positions 0..positions[t]
of s, read through s's page table. A batch with ``lookback`` bits (token trees)
masks by cache slot instead: token t sits in slot ``query_slots(batch)[t]`` and sees
the slots before it that its bits allow (``tree_visible``). Two equivalent formulations are provided;
``reference_attention`` picks, from the static shapes alone, the one that moves
fewer bytes:

- ``per_token``: gathers each token's own sequence KV, [T, L] keys. Cheap when
  every sequence contributes few tokens (decode).
- ``per_batch``: gathers every sequence's KV once, [S * L] keys, and masks
  other sequences out. Cheap for few long chunks (prefill).

Shapes: q [T, N, D]; k_cache, v_cache [K, P, PS, D]; output [T, N, D].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from arctic_jax.batch import LOOKBACK, StepBatch

_MASKED = -1e30  # finite, so a fully masked padding row stays finite


def query_slots(batch: StepBatch) -> jax.Array:
    """[T] the cache slot (index in its sequence) of each token: its chunk's tokens take the
    last slots before ``kv_lens``. Arbitrary for padding tokens."""
    qs = batch.query_start
    seq = batch.seq_ids
    t = jnp.arange(seq.shape[0], dtype=jnp.int32)
    return batch.kv_lens[seq] - (qs[seq + 1] - qs[seq]) + (t - qs[seq])


def tree_visible(distance: jax.Array, lookback: jax.Array) -> jax.Array:
    """Whether a query sees the key ``distance`` slots before it (any broadcastable shapes;
    ``lookback`` the query's bits). Itself and keys more than LOOKBACK back: always."""
    d = jnp.clip(distance - 1, 0, LOOKBACK - 1)
    bit = jnp.right_shift(lookback, d) & 1
    return (distance <= 0) | (distance > LOOKBACK) | (bit == 1)


def _key_mask(key_pos: jax.Array, batch: StepBatch) -> jax.Array:
    """[T, L] whether token t sees the key at position/slot key_pos[l] of its sequence
    (key_pos [L], or [T, L])."""
    if batch.lookback is None:
        return key_pos <= batch.positions[:, None]
    q = query_slots(batch)[:, None]
    return (key_pos <= q) & tree_visible(q - key_pos, batch.lookback[:, None])


def _softmax_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    scores_spec: str, out_spec: str, scale: float) -> jax.Array:
    if k.dtype != q.dtype:  # e.g. an fp8 cache: compute in the queries' dtype
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum(scores_spec, q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum(out_spec, probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def per_token(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: StepBatch,
              scale: float) -> jax.Array:
    T, N, D = q.shape
    K, _, PS, _ = k_cache.shape
    pages = batch.page_tables[batch.seq_ids]                     # [T, MP]
    L = pages.shape[1] * PS
    k = k_cache[:, pages].reshape(K, T, L, D)
    v = v_cache[:, pages].reshape(K, T, L, D)
    qg = q.reshape(T, K, N // K, D)
    mask = _key_mask(jnp.arange(L)[None, :], batch)[:, None, None, :]
    out = _softmax_attend(qg, k, v, mask, "tkgd,ktld->tkgl", "tkgl,ktld->tkgd", scale)
    return out.reshape(T, N, D)


def per_batch(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, batch: StepBatch,
              scale: float) -> jax.Array:
    T, N, D = q.shape
    K, _, PS, _ = k_cache.shape
    S, MP = batch.page_tables.shape
    L = MP * PS
    k = k_cache[:, batch.page_tables].reshape(K, S * L, D)
    v = v_cache[:, batch.page_tables].reshape(K, S * L, D)
    qg = q.reshape(T, K, N // K, D)
    key_seq = jnp.repeat(jnp.arange(S), L)
    key_pos = jnp.tile(jnp.arange(L), S)
    mask = ((key_seq[None, :] == batch.seq_ids[:, None])
            & _key_mask(key_pos[None, :], batch))[:, None, None, :]
    out = _softmax_attend(qg, k, v, mask, "tkgd,knd->tkgn", "tkgn,knd->tkgd", scale)
    return out.reshape(T, N, D)


def reference_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                        batch: StepBatch, scale: float) -> jax.Array:
    """Paged attention; output in q's dtype."""
    T, N, D = q.shape
    K = k_cache.shape[0]
    S, MP = batch.page_tables.shape
    L = MP * k_cache.shape[2]
    kv_bytes = 2 * K * D * k_cache.dtype.itemsize
    per_token_cost = T * L * (kv_bytes + 8 * N)
    per_batch_cost = S * L * kv_bytes + T * S * L * 8 * N
    impl = per_token if per_token_cost <= per_batch_cost else per_batch
    return impl(q, k_cache, v_cache, batch, scale).astype(q.dtype)
