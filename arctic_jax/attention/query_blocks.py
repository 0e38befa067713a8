"""Paged attention in query and key blocks, for any ragged step: the CPU's route ("blocked").

A loop walks the step's real tokens (tokens of sequence s are [query_start[s],
query_start[s + 1])) in segments, each one of two kinds:

- the next ``block_q`` tokens of a long chunk (at least ``block_q_token`` tokens: a prefill
  chunk) read their sequence's key pages once for all of them, in key blocks of ``block_k``
  slots (an online softmax);
- otherwise (decode rows, short verify chunks) up to ``block_q_token`` tokens, up to the next
  long chunk, each read their own sequence's key blocks.

Key blocks stop at the furthest slot a segment's tokens see, and padding tokens are never
visited, so a step costs what its tokens' causal attention costs, whatever its token and
page buckets. Loop trip counts depend on the batch's values: the function is for serving and
is not reverse-differentiable.

Shapes: q [T, N, D]; k_cache, v_cache [K, P, PS, D]; output [T, N, D] in q's dtype (rows of
padding tokens, t >= query_start[-1], are finite and arbitrary).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from arctic_jax.attention.reference import query_slots, tree_visible
from arctic_jax.batch import StepBatch

MASKED = -1e30       # finite: a fully masked (padding) row stays finite
BLOCK_Q = 128        # queries of a long run per segment
BLOCK_Q_TOKEN = 16   # tokens of a token-by-token segment (and the shortest chunk read as a run)
BLOCK_K = 256        # key slots per online-softmax step of a run (rounded to whole pages)
BLOCK_K_TOKEN = 64   # key slots per step of a token-by-token segment (each token gathers its own)

State = tuple[jax.Array, jax.Array, jax.Array]


def _init(shape: tuple[int, ...]) -> State:
    """Online-softmax state of rows [K, B, G, D]: running max, running sum, weighted values."""
    stats = shape[:-1] + (1,)
    return (jnp.full(stats, MASKED, jnp.float32), jnp.zeros(stats, jnp.float32),
            jnp.zeros(shape, jnp.float32))


def _update(state: State, scores: jax.Array, v: jax.Array, out_spec: str) -> State:
    """Fold one key block into the state: masked float32 scores [K, B, G, X] and its values.
    A row that saw only masked keys so far holds garbage that its first visible key wipes out
    (its weight exp(MASKED - score) is exactly 0)."""
    m, total, acc = state
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1, keepdims=True))
    p = jnp.exp(scores - m_new)
    corr = jnp.exp(m - m_new)
    total = total * corr + jnp.sum(p, axis=-1, keepdims=True)
    acc = acc * corr + jnp.einsum(out_spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, total, acc


def query_block_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                          batch: StepBatch, scale: float, *, block_q: int = BLOCK_Q,
                          block_q_token: int = BLOCK_Q_TOKEN, block_k: int = BLOCK_K,
                          block_k_token: int = BLOCK_K_TOKEN) -> jax.Array:
    """Paged attention of the step's real tokens, segment by segment (see the module
    docstring)."""
    q, k_cache, v_cache, batch = jax.tree_util.tree_map(jnp.asarray, (q, k_cache, v_cache, batch))
    T, N, D = q.shape
    K, _, PS, _ = k_cache.shape
    S, MP = batch.page_tables.shape
    G = N // K
    BQ, BT = min(block_q, T), min(block_q_token, block_q, T)
    KP, KPT = (max(1, min(b // PS, MP)) for b in (block_k, block_k_token))   # pages per key block
    width = -(-MP // math.lcm(KP, KPT)) * math.lcm(KP, KPT)
    tables = jnp.pad(batch.page_tables, ((0, 0), (0, width - MP)))   # padding: page 0, never seen
    tree = batch.lookback is not None
    slot = query_slots(batch) if tree else batch.positions    # each token's cache slot
    lookback = batch.lookback if tree else jnp.zeros_like(slot)
    qs = batch.query_start
    num_real = qs[-1]
    long_run = qs[batch.seq_ids + 1] - qs[batch.seq_ids] >= BT   # the token's chunk is long
    # padded by BQ so that every segment's slice fits
    qg = jnp.swapaxes(jnp.pad(q, ((0, BQ), (0, 0), (0, 0))).reshape(T + BQ, K, G, D), 0, 1)
    seq_ids, slot, lookback, long_run = (jnp.pad(x, (0, BQ)) for x in
                                         (batch.seq_ids, slot, lookback, long_run))

    def gather(cache: jax.Array, pages: jax.Array) -> jax.Array:
        x = cache[:, pages]
        x = x.reshape(K, *pages.shape[:-1], pages.shape[-1] * PS, D)
        return x if x.dtype == q.dtype else x.astype(q.dtype)   # e.g. an fp8 cache

    def masked_scores(qb: jax.Array, k: jax.Array, spec: str, first: jax.Array, tslot: jax.Array,
                      tlb: jax.Array, mine: jax.Array) -> jax.Array:
        """Scaled scores [K, B, G, BK] of the key block from slot ``first``, MASKED where a
        token does not see the key."""
        key_slot = first + jnp.arange(k.shape[-2], dtype=jnp.int32)[None, :]
        mask = mine[:, None] & (key_slot <= tslot[:, None])
        if tree:
            mask &= tree_visible(tslot[:, None] - key_slot, tlb[:, None])
        scores = jnp.einsum(spec, qb, k, preferred_element_type=jnp.float32)
        return jnp.where(mask[None, :, None, :], scores * scale, MASKED)

    def segment(t: jax.Array, B: int, kp: int, mine_of: Callable, rows_of: Callable, spec: str,
                out_spec: str) -> jax.Array:
        """Attention [K, B, G, D] of the B tokens from t (those ``mine_of(seq)``) over the pages
        ``rows_of(seq)`` ([width] or [B, width]), kp pages at a time."""
        qb = jax.lax.dynamic_slice_in_dim(qg, t, B, 1)
        seq, tslot, tlb = (jax.lax.dynamic_slice_in_dim(x, t, B) for x in (seq_ids, slot, lookback))
        mine = mine_of(seq) & (t + jnp.arange(B) < num_real)
        bk = kp * PS
        num_key_blocks = (jnp.max(jnp.where(mine, tslot, -1)) + bk) // bk
        rows = rows_of(seq)

        def key_block(j: jax.Array, state: State) -> State:
            pages = jax.lax.dynamic_slice_in_dim(rows, j * kp, kp, rows.ndim - 1)
            k, v = gather(k_cache, pages), gather(v_cache, pages)
            return _update(state, masked_scores(qb, k, spec, j * bk, tslot, tlb, mine), v,
                           out_spec)

        _, total, acc = jax.lax.fori_loop(0, num_key_blocks, key_block, _init((K, B, G, D)))
        return acc / total

    def write(out: jax.Array, ob: jax.Array, t: jax.Array) -> jax.Array:
        """A segment's rows [K, B, G, D] into the output [T + BQ, K, G, D] from token t (kept
        token-major, so that the output projection reads it without a copy of its weights)."""
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.swapaxes(ob, 0, 1), t, 0)

    def run(t: jax.Array, out: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One sequence's next BQ tokens (at most) over its own pages."""
        s = seq_ids[t]
        ob = segment(t, BQ, KP, lambda seq: seq == s, lambda seq: tables[s],
                     "kbgd,kxd->kbgx", "kbgx,kxd->kbgd")
        return t + jnp.minimum(qs[s + 1] - t, BQ), write(out, ob, t)

    def tokens(t: jax.Array, out: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The next BT tokens, each over its own pages, up to the next long run."""
        later_long = jax.lax.dynamic_slice_in_dim(long_run, t, BT) & (jnp.arange(BT) > 0)
        n = jnp.where(jnp.any(later_long), jnp.argmax(later_long), BT)
        ob = segment(t, BT, KPT, lambda seq: jnp.arange(BT) < n, lambda seq: tables[seq],
                     "kbgd,kbxd->kbgx", "kbgx,kbxd->kbgd")
        return t + n, write(out, ob, t)

    def step(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        t, out = carry
        return jax.lax.cond(long_run[t], run, tokens, t, out)

    _, out = jax.lax.while_loop(lambda c: c[0] < num_real, step,
                                (jnp.int32(0), jnp.zeros((T + BQ, K, G, D), jnp.float32)))
    return out[:T].reshape(T, N, D).astype(q.dtype)
