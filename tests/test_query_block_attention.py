"""The blocked paged attention (``arctic_jax.attention.query_blocks``, the CPU's "blocked" route)
against dense float64 oracles, on random caches and queries.

Small block sizes make a step of a few dozen tokens take every path: long chunks split into
several run segments and their short tails, token-by-token windows that stop where a long
chunk starts, windows full of decode rows, key loops over several key blocks, padding tokens,
padding sequences and page-table columns. Tree batches (lookback bits) use the tree-attention
tests' case and oracle.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_tree_attention as tree_case
from arctic_jax.attention.dispatch import default_attention_impl, needs_page_buckets, paged_attention
from arctic_jax.attention.query_blocks import query_block_attention
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from helpers import deal_pages
from oracles import paged_causal_attention, rel_err

KV_HEADS = 2
TOL = 2e-5
# (block_q, block_q_token, block_k, block_k_token) in tokens / key slots
SMALL = dict(block_q=8, block_q_token=3, block_k=8, block_k_token=4)
BLOCKS = [SMALL, dict(block_q=5, block_q_token=2, block_k=4, block_k_token=12),
          dict(block_q=1, block_q_token=1, block_k=4, block_k_token=4), {}]


def _specs(ps: int, order: str) -> list[tuple[int, int]]:
    """(start, new tokens) per sequence: decodes at kv lengths around page and key-block edges,
    a fresh prefill, chunks after a cached prefix (one longer than two run segments), and short
    (verify-like) chunks."""
    decodes = [(0, 1), (ps - 1, 1), (ps, 1), (3 * ps + 2, 1), (5 * ps + 1, 1)]
    chunks = [(0, 2 * ps + 3), (ps - 1, 19), (3, 2), (2 * ps, ps), (7, 1)]
    if order == "decodes first":
        return decodes + chunks
    if order == "chunks first":
        return chunks + decodes
    return [x for pair in zip(chunks, decodes, strict=True) for x in pair]   # interleaved


def _case(rng, specs, ps, ratio, head_dim, buckets, extra_pages=3, dtype=np.float32):
    needs = [-(-(s + n) // ps) for s, n in specs]
    num_pages = sum(needs) + extra_pages
    chunks = [SequenceChunk(tokens=list(rng.integers(0, 100, n)), start=s, pages=p, logits_at=[])
              for (s, n), p in zip(specs, deal_pages(rng, needs, num_pages), strict=True)]
    batch, _ = build_step_batch(chunks, ps, buckets)
    T = batch.tokens.shape[0]
    k_cache, v_cache = (rng.standard_normal((KV_HEADS, num_pages, ps, head_dim)).astype(dtype)
                        for _ in range(2))
    q = rng.standard_normal((T, KV_HEADS * ratio, head_dim)).astype(dtype)
    return q, k_cache, v_cache, batch, chunks


@functools.cache
def _jitted(scale: float, **blocks):
    return jax.jit(functools.partial(query_block_attention, scale=scale, **blocks))


def _run(q, k_cache, v_cache, batch, blocks):
    return np.asarray(_jitted(q.shape[-1] ** -0.5, **blocks)(q, k_cache, v_cache, batch))


@pytest.mark.parametrize("order", ["decodes first", "chunks first", "interleaved"])
@pytest.mark.parametrize("blocks", BLOCKS, ids=["small", "odd", "ones", "default"])
@pytest.mark.parametrize("ps,ratio", [(4, 3), (8, 1)])
def test_mixed_step_matches_oracle(order, blocks, ps, ratio):
    rng = np.random.default_rng(100 * ps + 10 * ratio + len(order))
    specs = _specs(ps, order)
    # 10 sequences -> S bucket 12; T bucket > tokens; MP bucket > any sequence's pages
    buckets = Buckets(tokens=(96,), seqs=(12,), pages=(16,))
    q, k_cache, v_cache, batch, chunks = _case(rng, specs, ps, ratio, 16, buckets)
    out = _run(q, k_cache, v_cache, batch, blocks)
    want, num_real = paged_causal_attention(q, k_cache, v_cache, chunks)
    assert num_real < q.shape[0], "the case should include padding tokens"
    assert rel_err(out[:num_real], want) <= TOL
    assert np.isfinite(out).all(), "padding rows must stay finite"


def test_cost_of_a_wider_page_table_is_nothing():
    """The result does not depend on the page bucket (the engine then compiles one): a table
    padded to 8x the columns gives bit-identical output."""
    rng = np.random.default_rng(5)
    q, k_cache, v_cache, narrow, chunks = _case(rng, _specs(4, "decodes first"), 4, 3, 16,
                                                Buckets((96,), (12,), (8,)))
    wide, _ = build_step_batch(chunks, 4, Buckets((96,), (12,), (64,)))
    assert wide.page_tables.shape[1] == 8 * narrow.page_tables.shape[1]
    np.testing.assert_array_equal(_run(q, k_cache, v_cache, wide, SMALL),
                                  _run(q, k_cache, v_cache, narrow, SMALL))


@pytest.mark.parametrize("blocks", [SMALL, {}], ids=["small", "default"])
def test_token_trees_match_oracle(blocks):
    """Tree chunks (lookback bits, one of 33 tokens), a prefill chunk and decodes in one step."""
    chunks, batch, q, kc, vc = tree_case._case(2)
    scale = tree_case.HEAD_DIM ** -0.5
    out = np.asarray(_jitted(scale, **blocks)(q, kc, vc, batch))
    n = sum(len(c.tokens) for c in chunks)
    want = tree_case._oracle(q, kc, vc, chunks, scale)
    assert rel_err(out[:n], want) <= TOL


def test_low_precision_cache_and_queries():
    """bfloat16 queries and cache, and a float8 cache read by float32 queries (upcast per key
    block), each against the oracle on the same rounded values."""
    rng = np.random.default_rng(11)
    specs = _specs(4, "interleaved")
    buckets = Buckets((96,), (12,), (8,))
    q, k_cache, v_cache, batch, chunks = _case(rng, specs, 4, 3, 16, buckets)
    q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k_cache, v_cache))
    out = np.asarray(_jitted(0.25, **SMALL)(q16, k16, v16, batch).astype(jnp.float32))
    want, n = paged_causal_attention(*(np.asarray(x, np.float32) for x in (q16, k16, v16)), chunks)
    assert rel_err(out[:n], want) <= 2e-2
    k8, v8 = (jnp.asarray(x, jnp.float8_e4m3fn) for x in (k_cache, v_cache))
    out = np.asarray(_jitted(0.25, **SMALL)(jnp.asarray(q), k8, v8, batch))
    want, n = paged_causal_attention(q, np.asarray(k8, np.float32), np.asarray(v8, np.float32), chunks)
    assert out.dtype == np.float32 and rel_err(out[:n], want) <= TOL


def test_all_padding_step_is_zero():
    """A warm-up step (no real token) visits nothing and returns finite zeros."""
    rng = np.random.default_rng(1)
    q, k_cache, v_cache, batch, _ = _case(rng, [(0, 5)], 4, 2, 16, Buckets((8,), (2,), (4,)))
    empty = jax.tree_util.tree_map(np.zeros_like, batch)
    out = _run(q, k_cache, v_cache, empty, SMALL)
    assert out.shape == q.shape and not out.any()


def test_dispatch_routes_blocked_and_cpu_default():
    rng = np.random.default_rng(2)
    q, k_cache, v_cache, batch, chunks = _case(rng, _specs(4, "chunks first"), 4, 3, 16,
                                               Buckets((96,), (12,), (8,)))
    out = np.asarray(paged_attention(q, k_cache, v_cache, batch, 0.25, impl="blocked"))
    want, n = paged_causal_attention(q, k_cache, v_cache, chunks)
    assert rel_err(out[:n], want) <= TOL
    assert default_attention_impl() == "blocked"          # these tests run on the CPU
    assert not needs_page_buckets("blocked") and needs_page_buckets("reference")
