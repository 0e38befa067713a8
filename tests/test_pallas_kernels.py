"""Pallas attention kernels vs plain-jnp oracles and arctic_jax's reference attention.

``TestKernels`` runs the kernels in interpret mode (CPU); ``TestKernelsGPU``
reruns every case compiled through Triton when JAX's backend is a GPU
(run with JAX_PLATFORMS=cuda, since conftest defaults to cpu).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.attention import contiguous_causal_attention
from arctic_jax.attention.kv_write_check import compile_write_kv, write_in_place_report
from arctic_jax.attention.pallas import paged_attention_pallas, select_mode
from arctic_jax.attention.reference import reference_attention
from arctic_jax.batch import Buckets, SequenceChunk, StepBatch, build_step_batch
from helpers import record_verified_triton_modules
from pallas_kernels import (
    DecodeConfig,
    PrefillConfig,
    block_schedule,
    paged_decode_attention,
    paged_decode_reference,
    ragged_prefill_attention,
    ragged_prefill_reference,
)

# (GQA ratio, head_dim, page_size): covers ratios 1/4/8, head_dim 64/128, pages 16/64.
SHAPES = [(1, 64, 16), (4, 128, 16), (8, 64, 64), (4, 64, 64), (1, 128, 64), (8, 128, 16)]
KV_HEADS = 2


def _cache(rng, num_pages, page_size, head_dim, dtype, kv_heads=KV_HEADS):
    shape = (kv_heads, num_pages, page_size, head_dim)
    return (jnp.asarray(rng.standard_normal(shape), dtype),
            jnp.asarray(rng.standard_normal(shape), dtype))


def _page_tables(rng, rows, max_pages, num_pages):
    """Distinct random pages per row; every column (used or not) holds a real page."""
    return rng.permutation(num_pages)[: rows * max_pages].reshape(rows, max_pages).astype(np.int32)


def _prefill_case(rng, new, prefix, page_size, extra_tokens=5):
    """query_start, kv_lens, T for sequences with `new` tokens after `prefix` cached ones."""
    new = np.asarray(new, np.int32)
    kv = new + np.asarray(prefix, np.int32)
    kv[new == 0] = 0                                   # sequences with no token are padding
    qs = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    return qs, kv.astype(np.int32), int(qs[-1]) + extra_tokens


class TestKernels:
    interpret = True
    f32_tol = 2e-5
    bf16_tol = 3e-2

    def _close(self, out, ref, tol):
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   atol=tol, rtol=tol)

    # ------------------------------------------------------------------ decode
    def _decode(self, q, kc, vc, pt, lens, rows=None, config=None):
        scale = 1.5 / np.sqrt(q.shape[-1])
        out = paged_decode_attention(q, kc, vc, jnp.asarray(pt), jnp.asarray(lens),
                                     None if rows is None else jnp.asarray(rows), scale=scale,
                                     config=config, interpret=self.interpret)
        ref = paged_decode_reference(q, kc, vc, jnp.asarray(pt), jnp.asarray(lens),
                                     None if rows is None else jnp.asarray(rows), scale=scale)
        return out, ref

    @pytest.mark.parametrize("group,head_dim,page_size", SHAPES)
    @pytest.mark.parametrize("config", [None, DecodeConfig(block_k=32, num_splits=3)],
                             ids=["auto", "bk32_ns3"])
    def test_decode_edge_lengths(self, group, head_dim, page_size, config):
        rng = np.random.default_rng(group * 1000 + head_dim + page_size)
        ps = page_size
        lens = np.array([1, ps - 1, ps, ps + 1, 0, 3 * ps + 5, 2 * ps], np.int32)
        mp, pages = 5, 48
        kc, vc = _cache(rng, pages, ps, head_dim, jnp.float32)
        q = jnp.asarray(rng.standard_normal((len(lens), KV_HEADS * group, head_dim)), jnp.float32)
        out, ref = self._decode(q, kc, vc, _page_tables(rng, len(lens), mp, pages), lens,
                                config=config)
        assert np.all(np.asarray(out[4]) == 0), "a padding row (kv_len 0) must give zeros"
        self._close(out, ref, self.f32_tol)

    def test_decode_long_context(self):
        rng = np.random.default_rng(7)
        ps, d, group = 16, 64, 4
        lens = np.array([3001, 17, 0, 2900], np.int32)
        mp = 192
        pages = len(lens) * mp
        kc, vc = _cache(rng, pages, ps, d, jnp.float32)
        q = jnp.asarray(rng.standard_normal((len(lens), KV_HEADS * group, d)), jnp.float32)
        out, ref = self._decode(q, kc, vc, _page_tables(rng, len(lens), mp, pages), lens)
        self._close(out, ref, self.f32_tol)

    def test_decode_bf16(self):
        rng = np.random.default_rng(8)
        ps, d, group = 16, 128, 4
        lens = np.array([70, 1, 33, 0], np.int32)
        kc, vc = _cache(rng, 32, ps, d, jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((4, KV_HEADS * group, d)), jnp.bfloat16)
        out, ref = self._decode(q, kc, vc, _page_tables(rng, 4, 6, 32), lens,
                                config=DecodeConfig(num_splits=2))
        assert out.dtype == jnp.bfloat16
        self._close(out, ref, self.bf16_tol)

    def test_decode_f32_queries_over_bf16_cache(self):
        rng = np.random.default_rng(10)
        kc, vc = _cache(rng, 16, 16, 64, jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((3, KV_HEADS * 4, 64)), jnp.float32)
        out, ref = self._decode(q, kc, vc, _page_tables(rng, 3, 5, 16), np.array([70, 16, 5]))
        assert out.dtype == jnp.float32
        self._close(out, ref, self.f32_tol)

    def test_decode_rows_share_sequences(self):
        """row_to_seq: several rows read one page-table row with different lengths."""
        rng = np.random.default_rng(9)
        ps, d, group = 16, 64, 8
        pt = _page_tables(rng, 2, 4, 16)
        rows = np.array([1, 0, 1, 1, 0], np.int32)
        lens = np.array([50, 3, 49, 0, 64], np.int32)
        kc, vc = _cache(rng, 16, ps, d, jnp.float32)
        q = jnp.asarray(rng.standard_normal((5, KV_HEADS * group, d)), jnp.float32)
        out, ref = self._decode(q, kc, vc, pt, lens, rows=rows)
        self._close(out, ref, self.f32_tol)

    def test_decode_rejects_bad_input(self):
        kc = vc = jnp.zeros((2, 4, 16, 64), jnp.float32)
        q = jnp.zeros((3, 4, 64), jnp.float32)
        with pytest.raises(ValueError, match="B=3 rows"):
            paged_decode_attention(q, kc, vc, jnp.zeros((2, 4), jnp.int32),
                                   jnp.zeros((3,), jnp.int32), scale=1.0, interpret=True)
        with pytest.raises(ValueError, match="head_dim"):
            paged_decode_attention(jnp.zeros((3, 4, 48)), jnp.zeros((2, 4, 16, 48)),
                                   jnp.zeros((2, 4, 16, 48)), jnp.zeros((3, 4), jnp.int32),
                                   jnp.zeros((3,), jnp.int32), scale=1.0, interpret=True)
        with pytest.raises(ValueError, match="not a multiple"):
            paged_decode_attention(jnp.zeros((3, 3, 64)), kc, vc, jnp.zeros((3, 4), jnp.int32),
                                   jnp.zeros((3,), jnp.int32), scale=1.0, interpret=True)

    # ----------------------------------------------------------------- prefill
    def _prefill(self, q, kc, vc, qs, kv, pt, config=None):
        scale = 1.5 / np.sqrt(q.shape[-1])
        out = ragged_prefill_attention(q, kc, vc, jnp.asarray(qs), jnp.asarray(kv), jnp.asarray(pt),
                                       scale=scale, config=config, interpret=self.interpret)
        ref = ragged_prefill_reference(q, kc, vc, qs, kv, pt, scale=scale)
        return out, ref

    @pytest.mark.parametrize("group,head_dim,page_size,config", [
        shape + (cfg,) for shape, cfg in zip(SHAPES, [None, PrefillConfig(16, 16)] * 3, strict=True)],
        ids=lambda v: "auto" if v is None else (f"bq{v.block_q}_bk{v.block_k}"
                                                  if isinstance(v, PrefillConfig) else str(v)))
    def test_prefill_ragged_with_prefix(self, group, head_dim, page_size, config):
        """Ragged lengths straddling query blocks, cached prefixes ending on/around page edges,
        a padding sequence in the middle and padding tokens at the end."""
        rng = np.random.default_rng(group * 7 + head_dim + page_size)
        ps = page_size
        new = [1, ps - 1, ps + 1, 5, 0, 2 * ps + 3, 19]
        prefix = [0, 1, ps - 1, ps, 0, ps + 1, 0]
        qs, kv, T = _prefill_case(rng, new, prefix, ps)
        mp = -(-int(kv.max()) // ps) + 1
        pages = len(new) * mp
        kc, vc = _cache(rng, pages, ps, head_dim, jnp.float32)
        q = jnp.asarray(rng.standard_normal((T, KV_HEADS * group, head_dim)), jnp.float32)
        out, ref = self._prefill(q, kc, vc, qs, kv, _page_tables(rng, len(new), mp, pages), config)
        assert np.all(np.asarray(out[qs[-1]:]) == 0), "padding tokens must give zeros"
        self._close(out, ref, self.f32_tol)

    def test_prefill_without_prefix(self):
        rng = np.random.default_rng(11)
        ps, d, group = 16, 64, 4
        qs, kv, T = _prefill_case(rng, [37, 64, 3], [0, 0, 0], ps, extra_tokens=0)
        kc, vc = _cache(rng, 24, ps, d, jnp.float32)
        q = jnp.asarray(rng.standard_normal((T, KV_HEADS * group, d)), jnp.float32)
        out, ref = self._prefill(q, kc, vc, qs, kv, _page_tables(rng, 3, 8, 24),
                                 PrefillConfig(block_q=32, block_k=32))
        self._close(out, ref, self.f32_tol)

    def test_prefill_long_prefix(self):
        rng = np.random.default_rng(12)
        ps, d, group = 16, 64, 4
        qs, kv, T = _prefill_case(rng, [200, 50], [2800, 0], ps)
        mp = 192
        kc, vc = _cache(rng, 2 * mp, ps, d, jnp.float32)
        q = jnp.asarray(rng.standard_normal((T, KV_HEADS * group, d)), jnp.float32)
        pt = _page_tables(rng, 2, mp, 2 * mp)
        out, ref = self._prefill(q, kc, vc, qs, kv, pt)
        self._close(out, ref, self.f32_tol)
        in_order, _ = self._prefill(q, kc, vc, qs, kv, pt, PrefillConfig(heavy_first=False))
        self._close(in_order, ref, self.f32_tol)

    def test_prefill_bf16_non_pow2_group(self):
        """GQA ratio 3 (SmolLM2: 9 heads / 3 kv heads) pads the group to 4 inside."""
        rng = np.random.default_rng(13)
        ps, d, group = 16, 64, 3
        qs, kv, T = _prefill_case(rng, [20, 1, 9], [5, 40, 0], ps)
        kc, vc = _cache(rng, 24, ps, d, jnp.bfloat16, kv_heads=3)
        q = jnp.asarray(rng.standard_normal((T, 3 * group, d)), jnp.bfloat16)
        out, ref = self._prefill(q, kc, vc, qs, kv, _page_tables(rng, 3, 8, 24))
        assert out.dtype == jnp.bfloat16
        self._close(out, ref, self.bf16_tol)

    @pytest.mark.parametrize("mode", ["prefill", "decode", "mixed"])
    def test_fp8_cache_matches_reference_on_the_same_values(self, mode):
        """An fp8 cache read by the kernels equals the reference over its f32 values."""
        rng = np.random.default_rng(33)
        ps, d, group, pages = 16, 64, 4, 48
        buckets = Buckets.for_limits(max_tokens=64, max_seqs=4, max_pages_per_seq=16)
        batch = self._step(rng, [(30, 0), (9, 40), (1, 75), (1, 16)], ps, buckets, pages)
        kc, vc = (x.astype(jnp.float8_e4m3fn) for x in _cache(rng, pages, ps, d, jnp.float32))
        T = batch.tokens.shape[0]
        q = jnp.asarray(rng.standard_normal((T, KV_HEADS * group, d)), jnp.float32)
        scale = 1.0 / np.sqrt(d)
        out = paged_attention_pallas(q, kc, vc, batch, scale, self.interpret, mode=mode)
        ref = reference_attention(q, kc.astype(jnp.float32), vc.astype(jnp.float32), batch, scale)
        n = int(batch.query_start[-1])
        self._close(out[:n], ref[:n], self.f32_tol)

    def test_contiguous_route_matches_causal_oracle(self):
        """The route for prompt-only steps: cuDNN on a GPU (bf16), XLA on CPU; GQA 4 and a
        padding tail after the sequence, whose rows are discarded."""
        rng = np.random.default_rng(31)
        n, T, kh, group, d = 300, 320, 2, 4, 128

        def draw(*shape: int) -> jax.Array:
            return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        q, k, v = draw(T, kh * group, d), draw(T, kh, d), draw(T, kh, d)
        scale = 1.0 / np.sqrt(d)
        out = contiguous_causal_attention(q, k, v, scale, impl="pallas")
        qf, kf, vf = (np.asarray(x[:n], np.float32) for x in (q, k, v))
        s = np.einsum("tkgd,skd->tkgs", qf.reshape(n, kh, group, d), kf) * scale
        s = np.where(np.tril(np.ones((n, n), bool))[:, None, None, :], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = np.einsum("tkgs,skd->tkgd", p, vf).reshape(n, kh * group, d)
        assert out.shape == q.shape and out.dtype == jnp.bfloat16
        self._close(out[:n], jnp.asarray(ref), self.bf16_tol)

    def test_prefill_all_padding(self):
        rng = np.random.default_rng(14)
        kc, vc = _cache(rng, 8, 16, 64, jnp.float32)
        q = jnp.asarray(rng.standard_normal((16, 4, 64)), jnp.float32)
        out, _ = self._prefill(q, kc, vc, np.zeros(3, np.int32), np.zeros(2, np.int32),
                               _page_tables(rng, 2, 4, 8))
        assert np.all(np.asarray(out) == 0)

    # ------------------------------------------------------- StepBatch contract
    def _step(self, rng, chunks_spec, page_size, buckets, num_pages):
        pages = rng.permutation(num_pages)
        chunks, used = [], 0
        for n_new, start in chunks_spec:
            need = -(-(start + n_new) // page_size)
            chunks.append(SequenceChunk(tokens=list(rng.integers(1, 100, n_new)), start=start,
                                        pages=list(pages[used:used + need])))
            used += need
        batch, _ = build_step_batch(chunks, page_size, buckets)
        return jax.tree_util.tree_map(jnp.asarray, batch)

    @pytest.mark.parametrize("mode", ["prefill", "decode", "mixed", "auto"])
    def test_matches_reference_attention_mixed_batch(self, mode):
        rng = np.random.default_rng(21)
        ps, d, group, pages = 16, 64, 4, 64
        buckets = Buckets.for_limits(max_tokens=128, max_seqs=8, max_pages_per_seq=16)
        # (new tokens, cached prefix): prefill, chunk on a prefix, decodes, page-edge cases.
        batch = self._step(rng, [(40, 0), (17, 33), (1, 15), (1, 16), (1, 90), (5, 0)], ps,
                           buckets, pages)
        kc, vc = _cache(rng, pages, ps, d, jnp.float32)
        T = batch.tokens.shape[0]
        q = jnp.asarray(rng.standard_normal((T, KV_HEADS * group, d)), jnp.float32)
        scale = 1.0 / np.sqrt(d)
        if mode == "auto":
            assert select_mode(T, batch.page_tables.shape[0]) == "mixed"
        out = paged_attention_pallas(q, kc, vc, batch, scale, self.interpret, mode=mode)
        ref = reference_attention(q, kc, vc, batch, scale)
        n = int(batch.query_start[-1])
        self._close(out[:n], ref[:n], self.f32_tol)
        assert np.all(np.asarray(out[n:]) == 0)

    def test_decode_step_auto_mode(self):
        rng = np.random.default_rng(22)
        ps, d, group, pages = 64, 128, 8, 40
        buckets = Buckets.for_limits(max_tokens=8, max_seqs=8, max_pages_per_seq=8, min_tokens=8)
        batch = self._step(rng, [(1, 63), (1, 64), (1, 0), (1, 200), (1, 129)], ps, buckets, pages)
        T, S = batch.tokens.shape[0], batch.page_tables.shape[0]
        assert select_mode(T, S) == "decode"
        kc, vc = _cache(rng, pages, ps, d, jnp.float32)
        q = jnp.asarray(rng.standard_normal((T, KV_HEADS * group, d)), jnp.float32)
        scale = 1.0 / np.sqrt(d)
        out = paged_attention_pallas(q, kc, vc, batch, scale, self.interpret)
        ref = reference_attention(q, kc, vc, batch, scale)
        self._close(out[:5], ref[:5], self.f32_tol)
        assert np.all(np.asarray(out[5:]) == 0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=cuda)")
class TestKernelsGPU(TestKernels):
    interpret = False
    f32_tol = 1e-4


def test_block_schedule_covers_every_token_once():
    rng = np.random.default_rng(31)
    S, T = 5, 220
    schedule = jax.jit(block_schedule, static_argnums=(2, 3, 4))
    for trial in range(24):
        new = rng.integers(0, 40, S) * (rng.random(S) < 0.8)       # some padding sequences
        qs = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
        kv = (new + rng.integers(0, 50, S)).astype(np.int32)
        kv[new == 0] = 0
        bq = (1, 2, 16)[trial % 3]
        sch = schedule(jnp.asarray(qs), jnp.asarray(kv), T, bq, 10_000)
        start, rows = np.asarray(sch.q_start), np.asarray(sch.num_rows)
        seq, pos0, stop = np.asarray(sch.seq), np.asarray(sch.first_pos), np.asarray(sch.kv_stop)
        hits = np.zeros(T, np.int32)
        for j in range(len(start)):
            assert 0 <= rows[j] <= bq
            hits[start[j]:start[j] + rows[j]] += 1
            if rows[j] == 0:
                continue
            if start[j] < qs[-1]:
                s = int(np.searchsorted(qs, start[j], side="right") - 1)
                assert start[j] + rows[j] <= qs[s + 1], "a block straddles two sequences"
                assert seq[j] == s and pos0[j] == kv[s] - new[s] + (start[j] - qs[s])
                assert stop[j] == pos0[j] + rows[j]
            else:
                assert stop[j] == 0
        np.testing.assert_array_equal(hits, np.ones(T, np.int32))


def test_write_kv_is_in_place_when_donated():
    shape = (2, 64, 16, 64)
    donated = write_in_place_report(compile_write_kv(shape, jnp.float32, 8), shape, jnp.float32)
    assert donated.in_place, donated
    copied = write_in_place_report(compile_write_kv(shape, jnp.float32, 8, donate=False), shape,
                                   jnp.float32)
    assert not copied.in_place and copied.cache_copies, copied


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the GPU class compiles the kernels")
@pytest.mark.parametrize("group,page_size", [(4, 16), (3, 64), (8, 64)])
def test_kernels_lower_to_triton_for_cuda(group, page_size, monkeypatch):
    """Cross-lowers both kernels (bf16, head_dim 128) to Triton IR for CUDA on the CPU and
    verifies the Triton modules, catching Triton lowering errors without a GPU."""
    verified = record_verified_triton_modules(monkeypatch)
    K, D, P = 8, 128, 512
    kc = jax.ShapeDtypeStruct((K, P, page_size, D), jnp.bfloat16)

    def i32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.int32)
    cases = [
        (lambda q, k, v, pt, ln: paged_decode_attention(q, k, v, pt, ln, scale=0.1),
         (jax.ShapeDtypeStruct((4, K * group, D), jnp.bfloat16), kc, kc, i32(4, 64), i32(4))),
        (lambda q, k, v, pt, ln: paged_decode_attention(
            q, k, v, pt, ln, scale=0.1, config=DecodeConfig(block_k=64, num_splits=1)),
         (jax.ShapeDtypeStruct((300, K * group, D), jnp.bfloat16), kc, kc, i32(300, 8), i32(300))),
        (lambda q, k, v, qs, ln, pt: ragged_prefill_attention(q, k, v, qs, ln, pt, scale=0.1),
         (jax.ShapeDtypeStruct((256, K * group, D), jnp.bfloat16), kc, kc, i32(5), i32(4),
          i32(4, 64))),
    ]
    skip = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    for fn, args in cases:
        try:
            jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[skip])(*args)
        except RuntimeError as e:
            if "compilation handler" in str(e):
                pytest.skip("this jaxlib compiles Triton at lowering time and has no CUDA plugin")
            raise
    if verified is not None:
        assert len(verified) == len(cases)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="cross-lowering check for the CPU suite")
@pytest.mark.parametrize("mode,prefill_backend", [
    ("prefill", "triton"), ("decode", "triton"), ("mixed", "triton"), ("prefill", "mosaic"),
    ("mixed", "mosaic")])
def test_attention_lowers_without_control_flow_for_cuda(mode, prefill_backend, monkeypatch):
    """The kernels' jnp wrappers (block schedule, masks, merges) hold no while/cond: on a GPU
    each would copy a predicate to the host per layer and block the step's launch. The
    Mosaic GPU prefill is lowered as on a Hopper GPU."""
    from arctic_jax.attention import pallas as attention_pallas
    monkeypatch.setattr(attention_pallas, "is_hopper", lambda: True)
    K, D, P, T, S, MP = 8, 128, 512, 256, 9, 64
    kc = jax.ShapeDtypeStruct((K, P, 16, D), jnp.bfloat16)

    def i32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = StepBatch(tokens=i32(T), positions=i32(T), slot_mapping=i32(T), seq_ids=i32(T),
                      page_tables=i32(S, MP), query_start=i32(S + 1), kv_lens=i32(S),
                      logits_indices=i32(S))

    def fn(q, k, v, batch):
        return paged_attention_pallas(q, k, v, batch, 0.1, mode=mode,
                                      prefill_backend=prefill_backend)

    try:
        text = jax.jit(fn).trace(jax.ShapeDtypeStruct((T, 32, D), jnp.bfloat16), kc, kc,
                                 batch).lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:
        if "compilation handler" in str(e):
            pytest.skip("this jaxlib compiles Triton at lowering time and has no CUDA plugin")
        raise
    if mode != "prefill" or prefill_backend == "triton":
        assert "tt_call" in text or "triton" in text, "expected the Triton kernels in the module"
    if prefill_backend == "mosaic":
        assert "mosaic_gpu" in text, "expected the Mosaic GPU prefill kernel in the module"
    for op in ("stablehlo.while", "stablehlo.case", "stablehlo.if"):
        assert op not in text, f"{op} in the {mode} attention program"
