"""The SwiftKV Llama step: prompt tokens skip the later layers.

One ragged step over T tokens with R logits rows (L layers, Lkv =
``num_key_value_layers``, G = (L - Lkv) / g K/V groups):

1. every token runs the Llama layers [0, Lkv), writing their K/V;
2. ``norm_swiftkv`` of the residual stream entering layer Lkv gives, through
   one fused projection [H, G, 2, K, D], the K/V of every later layer for all T
   tokens, RoPE'd at each token's position and written to the group's cache layer;
3. only the R logits rows (the last token of each prefill chunk, decodes,
   speculative verify rows) run layers [Lkv, L), their queries from
   ``q_proj_swiftkv``, attending over the paged cache as a rows-only batch;
4. the final norm of those rows is the step's hidden output [R, H].

Lkv = L is exactly ``llama.step``. Under a parallel variant the K/V projection
follows the early layers' layout (token-split under SP, then the usual
all-to-all to head-split attention); the logits rows are gathered once, after
layer Lkv - 1 (a masked local gather and one [R, H] all-reduce, never an
all-gather of the tokens), and the later layers run on them replicated over the
token axis with heads (and the MLP) split as in the variant. Arctic's plugin
runs those layers full-TP even inside an SP step; here an SP step reads 1/TP of
the later layers' weights per device instead of 1/(SP x TP), which for a step
large enough to be dispatched to SP is a small share of its time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from arctic_jax.attention.dispatch import paged_attention
from arctic_jax.batch import StepBatch
from arctic_jax.kv_cache import KVCache, write_kv
from arctic_jax.models import llama
from arctic_jax.models.llama import add_bias, rms_norm
from arctic_jax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin
from arctic_jax.models.step_options import StepOptions
from arctic_jax.models.swiftkv_config import SwiftKVConfig
from arctic_jax.models.swiftkv_weights import LateLayerWeights, SwiftKVWeights
from sharding import logical_axes as ax
from sharding.rules import constrain

ROWS_AXES = (ax.LOGITS_ROWS, ax.EMBED)
ROW_HEADS_AXES = (ax.LOGITS_ROWS, ax.Q_HEADS, ax.HEAD_DIM)
FANOUT_AXES = (ax.TOKENS, ax.KV_GROUPS, ax.KV_PAIR, ax.KV_HEADS, ax.HEAD_DIM)
FANOUT_ATTN_AXES = (ax.ATTN_TOKENS, ax.KV_GROUPS, ax.KV_PAIR, ax.ATTN_HEADS, ax.HEAD_DIM)


def rows_batch(batch: StepBatch) -> StepBatch:
    """The R logits rows of ``batch`` as a batch of their own over the same pages.

    Row r is token ``logits_indices[r]`` (position, sequence and lookback bits unchanged);
    sequence s owns rows ``logits_start[s]`` .. ``logits_start[s + 1] - 1``, which must be
    consecutive tokens of its chunk (they are: the last token of a prefill chunk, a decode, a
    verify chunk's every token). A plain sequence's KV length becomes its last row's position
    plus one, so its rows are the last queries before it; a token-tree batch keeps its KV
    lengths (its rows end its chunk). Sequences without rows get KV length 0.
    """
    if batch.logits_start is None:
        raise ValueError("a SwiftKV step needs batch.logits_start (build_step_batch sets it)")
    idx = batch.logits_indices
    R, S = idx.shape[0], batch.page_tables.shape[0]
    starts = batch.logits_start
    has_rows = starts[1:] > starts[:-1]
    positions = batch.positions[idx]
    if batch.lookback is None:
        last = jnp.clip(starts[1:] - 1, 0, R - 1)
        kv_lens = jnp.where(has_rows, positions[last] + 1, 0)
    else:
        kv_lens = jnp.where(has_rows, batch.kv_lens, 0)
    live = jnp.arange(R, dtype=jnp.int32) < starts[S]
    return StepBatch(tokens=batch.tokens[idx], positions=positions,
                     slot_mapping=jnp.where(live, batch.slot_mapping[idx], -1),
                     seq_ids=batch.seq_ids[idx], page_tables=batch.page_tables,
                     query_start=starts, kv_lens=kv_lens.astype(jnp.int32),
                     logits_indices=jnp.arange(R, dtype=jnp.int32),
                     lookback=None if batch.lookback is None else batch.lookback[idx],
                     logits_start=starts)


def kv_fanout(cfg: SwiftKVConfig, opts: StepOptions, weights: SwiftKVWeights, x: jax.Array,
              cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Residual x [T, H] entering layer Lkv -> every group's k (RoPE'd), v [T, G, K, D] in the
    attention layout."""
    sh = opts.sharding
    h = rms_norm(x, weights.norm_swiftkv, cfg.rms_norm_eps)
    kv = add_bias(jnp.einsum("th,hgckd->tgckd", h, weights.kv_fanout), weights.kv_fanout_bias)
    kv = constrain(sh, kv, FANOUT_AXES)
    kv = constrain(sh, kv, FANOUT_ATTN_AXES)
    T, G, _, K, D = kv.shape
    k = apply_rope(kv[:, :, 0].reshape(T, G * K, D), cos, sin).reshape(T, G, K, D)  # one pass
    return k, kv[:, :, 1]


def late_layer(cfg: SwiftKVConfig, opts: StepOptions, layer: LateLayerWeights, x: jax.Array,
               cache_k: jax.Array, cache_v: jax.Array, rows: StepBatch, cos: jax.Array,
               sin: jax.Array) -> jax.Array:
    """One layer >= Lkv on the logits rows: x [R, H] -> x [R, H]; its K/V are already cached."""
    sh = opts.sharding
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    q = add_bias(jnp.einsum("rh,hnd->rnd", h, layer.q_proj), layer.q_bias)
    q = constrain(sh, q, ROW_HEADS_AXES)
    q = apply_rope(constrain(sh, q, ax.ATTN_QKV_AXES), cos, sin)
    attn = paged_attention(q, cache_k, cache_v, rows, scale=cfg.head_dim ** -0.5,
                           impl=opts.attention.impl, sharding=sh)
    attn = constrain(sh, attn, ROW_HEADS_AXES)
    x = x + constrain(sh, add_bias(llama.out_projection(attn, layer.o_proj), layer.o_bias),
                      ROWS_AXES)
    return x + constrain(sh, llama.mlp_block(cfg, layer, x), ROWS_AXES)


def step(weights: SwiftKVWeights, kv_cache: KVCache, batch: StepBatch, *, cfg: SwiftKVConfig,
         opts: StepOptions = StepOptions()) -> tuple[jax.Array, KVCache]:
    """One ragged step: the final-normed hidden rows [R, H] of ``batch.logits_indices`` and the
    updated cache (``cfg.num_cache_layers`` layers)."""
    inv_freq = inverse_frequencies(cfg)
    cos, sin = rope_cos_sin(batch.positions, inv_freq)
    sh = opts.sharding
    ks, vs = list(kv_cache.k), list(kv_cache.v)
    x = llama.embed(weights, batch.tokens, sh)
    for i, layer in enumerate(weights.layers):
        x, ks[i], vs[i] = llama.shared_decoder_layer(cfg, opts, layer, x, ks[i], vs[i], batch, cos,
                                                     sin)
    rows_x = constrain(sh, x[batch.logits_indices], ROWS_AXES)
    if weights.late_layers:
        Lkv = cfg.num_key_value_layers
        k, v = kv_fanout(cfg, opts, weights, x, cos, sin)
        for j in range(cfg.num_kv_groups):
            ks[Lkv + j], vs[Lkv + j] = write_kv(ks[Lkv + j], vs[Lkv + j], k[:, j], v[:, j],
                                                batch.slot_mapping)
        rows = rows_batch(batch)
        cos_r, sin_r = rope_cos_sin(rows.positions, inv_freq)
        for i, layer in enumerate(weights.late_layers):
            c = cfg.cache_layer(Lkv + i)
            rows_x = late_layer(cfg, opts, layer, rows_x, ks[c], vs[c], rows, cos_r, sin_r)
    hidden = llama.final_norm(cfg, weights, rows_x)
    return hidden, KVCache(k=tuple(ks), v=tuple(vs), page_size=kv_cache.page_size)
