"""The packed bidirectional attention kernel (interpret mode) against a dense segment-masked oracle."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import record_verified_triton_modules
from pallas_kernels.segment_attention import key_ranges, segment_attention_pallas


def _packing(lengths, num_seqs: int, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """seq_start [S+1], segment_ids [T] for sequences of ``lengths`` (0 = empty slot) packed
    back to back; unused slots are empty at the end, padding tokens get S."""
    lengths = list(lengths) + [0] * (num_seqs - len(lengths))
    seq_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    assert seq_start[-1] <= num_tokens
    seg = np.full(num_tokens, num_seqs, np.int32)
    for s in range(num_seqs):
        seg[seq_start[s]:seq_start[s + 1]] = s
    return seq_start, seg


def _oracle(q, k, v, seg, n_real: int, scale: float) -> np.ndarray:
    """Dense softmax in float64 over keys of the same segment; padding rows 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    real = np.arange(q.shape[0]) < n_real
    allowed = (seg[:, None] == seg[None, :]) & real[:, None] & real[None, :]       # [T, T]
    s = np.einsum("tnd,und->ntu", q, k) * scale
    s = np.where(allowed[None], s, -np.inf)
    s = s - np.max(np.where(allowed[None], s, -1e300), axis=-1, keepdims=True)
    p = np.where(allowed[None], np.exp(s), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("ntu,und->tnd", p, v)


def _inputs(rng, T, N, D, kv_heads=None, dtype=jnp.float32):
    kv_heads = kv_heads or N
    q = rng.standard_normal((T, N, D)) * 1.5
    k = rng.standard_normal((T, kv_heads, D)) * 1.5
    v = rng.standard_normal((T, kv_heads, D))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _run(q, k, v, seq_start, seg, **kw):
    return segment_attention_pallas(q, k, v, jnp.asarray(seq_start), jnp.asarray(seg),
                                    interpret=True, **kw)


CASES = [
    # (name, lengths, seq slots, T, heads, kv heads, head_dim, block_q, block_k)
    ("one_sequence_fills_T", [160], 1, 160, 2, 2, 64, None, None),
    ("many_short", [3, 17, 1, 9, 30, 12, 2, 25, 8, 11, 6, 19], 16, 200, 2, 2, 32, None, None),
    ("odd_lengths_empty_slots_padding", [37, 0, 90, 5, 61], 8, 256, 2, 2, 64, None, None),
    ("T_below_a_block", [3, 4], 3, 10, 2, 2, 32, None, None),
    ("small_blocks_many_tiles", [40, 33, 17], 5, 100, 2, 2, 32, 16, 16),
    ("gqa_group_of_3", [21, 50, 7], 4, 96, 6, 2, 32, 32, 16),
]


@pytest.mark.parametrize("name,lengths,S,T,N,K,D,bq,bk", CASES, ids=[c[0] for c in CASES])
def test_matches_dense_oracle_f32(name, lengths, S, T, N, K, D, bq, bk):
    rng = np.random.default_rng([c[0] for c in CASES].index(name))
    seq_start, seg = _packing(lengths, S, T)
    q, k, v = _inputs(rng, T, N, D, K)
    scale = D ** -0.5
    out = _run(q, k, v, seq_start, seg, scale=scale, block_q=bq, block_k=bk)
    assert out.shape == (T, N, D) and out.dtype == jnp.float32
    n_real = int(seq_start[-1])
    ref = _oracle(q, k, v, seg, n_real, scale)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
    assert np.all(np.asarray(out[n_real:]) == 0), "padding rows must be exactly 0"


def test_bf16_inputs():
    rng = np.random.default_rng(7)
    T, N, D = 192, 2, 64
    seq_start, seg = _packing([70, 1, 45, 60], 6, T)
    q, k, v = _inputs(rng, T, N, D, dtype=jnp.bfloat16)
    out = _run(q, k, v, seq_start, seg, scale=D ** -0.5)
    assert out.dtype == jnp.bfloat16
    n_real = int(seq_start[-1])
    ref = _oracle(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), seg, n_real,
                  D ** -0.5)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2)
    assert np.all(np.asarray(out[n_real:], np.float32) == 0)


def test_a_sequence_never_sees_another():
    """Perturbing every other sequence's q/k/v leaves this sequence's output bit-identical,
    also where query and key blocks straddle the boundary (small blocks, unaligned lengths)."""
    rng = np.random.default_rng(11)
    T, N, D = 100, 2, 32
    seq_start, seg = _packing([23, 40, 19], 4, T)
    q, k, v = _inputs(rng, T, N, D)
    kw = dict(scale=D ** -0.5, block_q=16, block_k=16)
    base = np.asarray(_run(q, k, v, seq_start, seg, **kw))
    mine = seg == 1
    others = jnp.asarray(~mine)[:, None, None]
    noise = _inputs(rng, T, N, D)
    q2, k2, v2 = (jnp.where(others, x + 3.0 * n, x) for x, n in zip((q, k, v), noise, strict=True))
    out = np.asarray(_run(q2, k2, v2, seq_start, seg, **kw))
    np.testing.assert_array_equal(out[mine], base[mine])
    assert not np.allclose(out[seg == 0], base[seg == 0]), "the perturbation must change the others"


def test_key_ranges_cover_each_block_and_skip_other_sequences():
    rng = np.random.default_rng(3)
    ranges = jax.jit(key_ranges, static_argnums=(2, 3, 4))
    for trial in range(12):
        S, T = 9, 300
        lengths = rng.integers(0, 45, S) * (rng.random(S) < 0.8)
        seq_start, seg = _packing(lengths, S, T)
        bq, bk = (16, 32, 64)[trial % 3], (16, 64)[trial % 2]
        k_lo, n_tiles, n_full = (np.asarray(x) for x in ranges(jnp.asarray(seq_start), jnp.asarray(seg),
                                                                T, bq, bk))
        n_real = int(seq_start[-1])
        for i in range(len(k_lo)):
            toks = np.arange(i * bq, min((i + 1) * bq, n_real))
            if toks.size == 0:
                assert n_tiles[i] == 0
                continue
            segs = np.unique(seg[toks])
            lo, hi = seq_start[segs.min()], seq_start[segs.max() + 1]
            assert k_lo[i] == lo and n_tiles[i] == -(-(hi - lo) // bk)
            assert n_full[i] == ((hi - lo) // bk if segs.size == 1 else 0)
    # packed short sequences: each block of 16 walks one tile of its own 16 keys, not all T
    seq_start, seg = _packing([16] * 64, 64, 1024)
    _, n_tiles, _ = ranges(jnp.asarray(seq_start), jnp.asarray(seg), 1024, 16, 16)
    assert int(np.sum(n_tiles)) == 64


def test_rejects_bad_input():
    q = jnp.ones((8, 2, 32), jnp.float32)
    ss, seg = jnp.asarray([0, 8], jnp.int32), jnp.zeros((8,), jnp.int32)
    with pytest.raises(ValueError, match="head_dim"):
        segment_attention_pallas(jnp.ones((8, 2, 24)), jnp.ones((8, 2, 24)), jnp.ones((8, 2, 24)),
                                 ss, seg, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        segment_attention_pallas(jnp.ones((8, 3, 32)), q, q, ss, seg, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="k and v"):
        segment_attention_pallas(q, q, q[:4], ss, seg, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="segment_ids"):
        segment_attention_pallas(q, q, q, ss, seg[:5], scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="block_q"):
        segment_attention_pallas(q, q, q, ss, seg, scale=1.0, interpret=True, block_q=24)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="cross-lowering check for the CPU suite")
@pytest.mark.parametrize("head_dim", [32, 64])
def test_lowers_to_triton_for_cuda_without_host_sync(head_dim, monkeypatch):
    """Cross-lowers the kernel (bf16, BERT-like shapes, T not a multiple of the block) to Triton
    IR for CUDA on the CPU, MLIR-verifies the Triton module, and checks that the jnp wrapper
    holds no while/cond (each would sync with the host on a GPU)."""
    verified = record_verified_triton_modules(monkeypatch)
    T, N, S = 1000, 12, 40
    x = jax.ShapeDtypeStruct((T, N, head_dim), jnp.bfloat16)

    def fn(q, k, v, ss, seg):
        return segment_attention_pallas(q, k, v, ss, seg, scale=head_dim ** -0.5)
    try:
        text = jax.jit(fn).trace(x, x, x, jax.ShapeDtypeStruct((S + 1,), jnp.int32),
                                 jax.ShapeDtypeStruct((T,), jnp.int32)
                                 ).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
        if "compilation handler" in str(e):
            pytest.skip("this jaxlib compiles Triton at lowering time and has no CUDA plugin")
        raise
    assert "tt_call" in text or "triton" in text, "expected the Triton kernel in the module"
    for op in ("stablehlo.while", "stablehlo.case", "stablehlo.if"):
        assert op not in text, f"{op} in the wrapper"
    if verified is not None:
        assert len(verified) == 1
