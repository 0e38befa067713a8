"""Reference paged attention (per_token, per_batch, reference_attention) vs a dense numpy oracle.

Random q and random cache contents everywhere (so stale slots beyond a
sequence's length would show up), sequences on shuffled, interleaved pages,
ragged chunks, and padding tokens / sequences / page-table columns.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from arctic_jax.attention import reference
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.pytree import replace
from helpers import deal_pages
from oracles import dense_causal_attention, paged_causal_attention, rel_err

NUM_KV_HEADS = 2
TOL = 2e-5


def _mixed_specs(ps: int) -> list[tuple[int, int]]:
    """(start, new tokens) per sequence: decode rows, fresh prefills, chunks after a cached prefix.

    KV lengths cover 1, ps - 1, ps, ps + 1 and longer.
    """
    return [
        (0, 1),            # first token: kv length 1
        (ps - 2, 1),       # decode, kv length ps - 1
        (ps - 1, 1),       # decode, kv length ps
        (ps, 1),           # decode, kv length ps + 1 (first slot of a new page)
        (2 * ps + 2, 1),   # decode, longer
        (0, ps + 1),       # fresh prefill crossing a page boundary
        (ps - 1, ps + 2),  # chunk after a cached prefix, crossing two boundaries
        (3, 2),            # short chunk after a short prefix
        (ps, ps),          # page-aligned chunk after a full page
    ]


def _make_case(rng, specs, ps, ratio, head_dim, buckets, extra_pages=3):
    """Random cache, q and StepBatch for ``specs``; pages dealt round-robin from a shuffled pool."""
    needs = [-(-(s + n) // ps) for s, n in specs]
    num_pages = sum(needs) + extra_pages
    pages = deal_pages(rng, needs, num_pages)
    chunks = [SequenceChunk(tokens=list(rng.integers(0, 100, n)), start=s, pages=p,
                            logits_at=[])
              for (s, n), p in zip(specs, pages, strict=True)]
    batch, _ = build_step_batch(chunks, ps, buckets)
    K, N = NUM_KV_HEADS, NUM_KV_HEADS * ratio
    T = batch.tokens.shape[0]
    k_cache = rng.standard_normal((K, num_pages, ps, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((K, num_pages, ps, head_dim)).astype(np.float32)
    q = rng.standard_normal((T, N, head_dim)).astype(np.float32)
    return q, k_cache, v_cache, batch, chunks


@functools.cache
def _jitted(name: str, scale: float):
    fn = getattr(reference, name)
    return jax.jit(lambda q, k, v, b: fn(q, k, v, b, scale))


def _check(name, q, k_cache, v_cache, batch, chunks, ps):
    head_dim = q.shape[-1]
    out = np.asarray(_jitted(name, head_dim ** -0.5)(q, k_cache, v_cache, batch))
    assert out.shape == q.shape
    want, num_real = paged_causal_attention(q, k_cache, v_cache, chunks)
    err = rel_err(out[:num_real], want)
    assert err <= TOL, f"{name}: rel err {err:.3g}"
    assert num_real < q.shape[0], "the case should include padding tokens"
    assert np.isfinite(out[num_real:]).all(), f"{name}: padding rows not finite"


@pytest.mark.parametrize("ps", [4, 16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_mixed_ragged_batch_matches_oracle(ratio, head_dim, ps):
    rng = np.random.default_rng(1000 * ratio + 10 * head_dim + ps)
    specs = _mixed_specs(ps)
    # 9 sequences -> S bucket 12 (3 padding sequences); T bucket > tokens; MP bucket > pages.
    buckets = Buckets(tokens=(64,), seqs=(12,), pages=(8,))
    case = _make_case(rng, specs, ps, ratio, head_dim, buckets)
    q, k_cache, v_cache, batch, chunks = case
    assert batch.page_tables.shape[0] > len(chunks)
    for name in ("per_token", "per_batch", "reference_attention"):
        _check(name, *case, ps)


@pytest.mark.parametrize("ps", [4, 16])
def test_page_order_matters(ps):
    """Swapping two pages of a sequence changes its output (the page table is really used)."""
    rng = np.random.default_rng(7 + ps)
    buckets = Buckets(tokens=(16,), seqs=(2,), pages=(4,))
    q, k_cache, v_cache, batch, chunks = _make_case(rng, [(ps + 1, 2)], ps, 4, 64, buckets)
    fn = _jitted("per_token", 64 ** -0.5)
    out = np.asarray(fn(q, k_cache, v_cache, batch))
    table = np.array(batch.page_tables)
    table[0, [0, 1]] = table[0, [1, 0]]
    swapped = np.asarray(fn(q, k_cache, v_cache, replace(batch, page_tables=table)))
    assert rel_err(swapped[:2], out[:2]) > 1e-2


@pytest.mark.parametrize("specs,tokens,seqs,want", [
    ([(s, 1) for s in (0, 2, 3, 4, 9, 12, 15)], 8, 8, "per_token"),   # decode
    ([(0, 30)], 32, 1, "per_batch"),                                  # one long prefill
])
def test_reference_attention_picks_each_formulation(monkeypatch, specs, tokens, seqs, want):
    """Both branches of the cost switch are taken on typical shapes, and both match the oracle."""
    ps = 4
    rng = np.random.default_rng(3)
    buckets = Buckets(tokens=(tokens,), seqs=(seqs,), pages=(8,))
    case = _make_case(rng, specs, ps, 4, 64, buckets)
    called = []

    def spy(name):
        original = getattr(reference, name)
        return lambda *a, **kw: called.append(name) or original(*a, **kw)

    for name in ("per_token", "per_batch"):
        monkeypatch.setattr(reference, name, spy(name))
    q, k_cache, v_cache, batch, chunks = case
    out = np.asarray(reference.reference_attention(q, k_cache, v_cache, batch, 64 ** -0.5))
    assert called == [want]
    want_out, num_real = paged_causal_attention(q, k_cache, v_cache, chunks)
    assert rel_err(out[:num_real], want_out) <= TOL
    assert np.isfinite(out).all()


@pytest.mark.parametrize("ratio", [1, 4])
def test_oracle_matches_torch_sdpa(ratio):
    """The dense oracle itself against torch's scaled_dot_product_attention (float64, GQA)."""
    import torch

    rng = np.random.default_rng(ratio)
    T, L, K, D = 5, 9, 2, 16
    q = rng.standard_normal((T, K * ratio, D))
    k, v = rng.standard_normal((L, K, D)), rng.standard_normal((L, K, D))
    positions = np.arange(L - T, L)
    mask = torch.from_numpy(np.arange(L)[None, :] <= positions[:, None])

    def to_t(x: np.ndarray) -> torch.Tensor:                  # [len, heads, D] -> [1, heads, len, D]
        return torch.from_numpy(np.swapaxes(x, 0, 1)[None])
    want = torch.nn.functional.scaled_dot_product_attention(
        to_t(q), to_t(k), to_t(v), attn_mask=mask, enable_gqa=True)[0].numpy()
    got = dense_causal_attention(q, k, v, positions)
    assert rel_err(got, np.swapaxes(want, 0, 1)) <= 1e-12


def test_unknown_attention_impl_is_rejected_by_both_routes():
    from arctic_jax.attention import contiguous_causal_attention, paged_attention

    rng = np.random.default_rng(2)
    q, k_cache, v_cache, batch, _ = _make_case(rng, [(0, 5)], 4, 2, 8,
                                               Buckets(tokens=(8,), seqs=(1,), pages=(4,)))
    with pytest.raises(ValueError, match="unknown attention_impl 'triton'"):
        paged_attention(q, k_cache, v_cache, batch, 0.3, impl="triton")
    k = rng.standard_normal((q.shape[0], NUM_KV_HEADS, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="unknown attention_impl 'triton'"):
        contiguous_causal_attention(q, k, k, 0.3, impl="triton")


@pytest.mark.parametrize("impl", ["pallas", "pallas-triton"])
def test_pallas_impls_match_the_oracle(impl):
    """Both Pallas routes (interpret mode here) agree with the dense oracle on a mixed step."""
    from arctic_jax.attention import paged_attention

    rng = np.random.default_rng(3)
    ps, head_dim = 8, 16
    q, k_cache, v_cache, batch, chunks = _make_case(
        rng, [(0, 21), (13, 6), (30, 1), (15, 1)], ps, 2, head_dim,
        Buckets(tokens=(32,), seqs=(4,), pages=(8,)))
    out = paged_attention(q, k_cache, v_cache, jax.tree_util.tree_map(np.asarray, batch),
                          head_dim ** -0.5, impl=impl)
    want, num_real = paged_causal_attention(q, k_cache, v_cache, chunks)
    assert rel_err(np.asarray(out[:num_real]), want) <= TOL
