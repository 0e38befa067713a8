"""The Mosaic GPU ragged prefill kernel against a float64 numpy oracle (on a Hopper GPU), and its
lowering for CUDA (on the CPU: Mosaic GPU has no public interpret mode)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.attention.pallas import paged_attention_pallas, select_prefill_backend
from arctic_jax.attention.reference import reference_attention
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from oracles import dense_causal_attention, gather_sequence_kv
from pallas_kernels.ragged_prefill_mgpu import (
    MosaicPrefillConfig,
    is_hopper,
    ragged_prefill_attention_mgpu,
    unsupported_reason,
)

BF16_TOL = 3e-2


def _case(rng, new, prefix, page_size, kv_heads, group, head_dim, extra_tokens, dtype):
    """Random q and paged cache for sequences of `new` tokens after `prefix` cached ones."""
    new = np.asarray(new, np.int32)
    kv = np.where(new > 0, new + np.asarray(prefix, np.int32), 0).astype(np.int32)
    qs = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    T = int(qs[-1]) + extra_tokens
    mp = -(-int(max(kv.max(), 1)) // page_size) + 1
    pages = len(new) * mp + 3
    shape = (kv_heads, pages, page_size, head_dim)
    kc = jnp.asarray(rng.standard_normal(shape), dtype)
    vc = jnp.asarray(rng.standard_normal(shape), dtype)
    pt = rng.permutation(pages)[: len(new) * mp].reshape(len(new), mp).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((T, kv_heads * group, head_dim)), dtype)
    return q, kc, vc, qs, kv, pt


def _numpy_oracle(q, kc, vc, qs, kv, pt, scale):
    """float64 numpy oracle (fast on the host: no per-shape GPU compiles)."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    out = np.zeros(q.shape)
    for s in range(len(kv)):
        n = int(qs[s + 1] - qs[s])
        if n == 0 or kv[s] == 0:
            continue
        k, v = (gather_sequence_kv(cache, pt[s], kv[s]) for cache in (kc, vc))
        out[qs[s]:qs[s + 1]] = dense_causal_attention(q[qs[s]:qs[s + 1]], k, v,
                                                      np.arange(kv[s] - n, kv[s]), scale)
    return out


def _check(q, kc, vc, qs, kv, pt, config=None):
    scale = 1.3 / np.sqrt(q.shape[-1])
    out = ragged_prefill_attention_mgpu(q, kc, vc, jnp.asarray(qs), jnp.asarray(kv),
                                        jnp.asarray(pt), scale=scale, config=config)
    ref = _numpy_oracle(q, kc, vc, qs, kv, pt, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=BF16_TOL, rtol=BF16_TOL)
    assert np.all(np.asarray(out[int(qs[-1]):], np.float32) == 0), "padding tokens must give 0"
    return out


@pytest.mark.skipif(not is_hopper(), reason="Mosaic GPU kernel: needs a Hopper GPU (JAX_PLATFORMS=cuda)")
class TestMosaicPrefillGPU:
    @pytest.mark.parametrize("group,head_dim,page_size", [
        (4, 128, 16), (1, 64, 16), (8, 128, 64), (3, 64, 64), (4, 128, 256), (4, 64, 8)])
    def test_ragged_with_prefix(self, group, head_dim, page_size):
        """Blocks that end mid-tile, prefixes on and around page edges, an empty sequence in
        the middle, sequences longer than a block, and padding tokens at the end."""
        rng = np.random.default_rng(group * 11 + head_dim + page_size)
        ps = page_size
        new = [1, ps - 1, 130, 5, 0, 2 * ps + 3, 300, 64]
        prefix = [0, 1, ps - 1, ps, 0, ps + 1, 777, 0]
        _check(*_case(rng, new, prefix, ps, 2, group, head_dim, 37, jnp.bfloat16))

    @pytest.mark.parametrize("config,head_dim", [
        (MosaicPrefillConfig(block_k=64), 128), (MosaicPrefillConfig(block_k=64, num_stages=3), 128),
        (MosaicPrefillConfig(block_k=192), 64), (MosaicPrefillConfig(heads_per_program=1), 128),
        (MosaicPrefillConfig(heads_per_program=2, num_stages=3, block_k=64), 64)],
        ids=["bk64", "bk64_stages3", "bk192_d64", "1_head", "2_heads_stages3"])
    def test_configs(self, config, head_dim):
        rng = np.random.default_rng(5)
        _check(*_case(rng, [257, 40, 129], [1000, 0, 64], 16, 2, 4, head_dim, 3, jnp.bfloat16),
               config)

    def test_skipping_empty_rows_keeps_the_others(self):
        """fill_empty=False (mixed mode) computes the same rows for sequences with keys."""
        rng = np.random.default_rng(9)
        q, kc, vc, qs, kv, pt = _case(rng, [1, 200, 1, 70, 1], [40, 30, 9, 0, 300], 16, 2, 4, 128,
                                      20, jnp.bfloat16)
        kv = np.where(np.diff(qs) == 1, 0, kv).astype(np.int32)     # as mixed mode passes them
        full = _check(q, kc, vc, qs, kv, pt)
        part = ragged_prefill_attention_mgpu(q, kc, vc, jnp.asarray(qs), jnp.asarray(kv),
                                             jnp.asarray(pt), scale=1.3 / np.sqrt(128),
                                             fill_empty=False)
        for s in (1, 3):
            np.testing.assert_array_equal(np.asarray(part[qs[s]:qs[s + 1]], np.float32),
                                          np.asarray(full[qs[s]:qs[s + 1]], np.float32))

    def test_long_prefill_f16(self):
        rng = np.random.default_rng(6)
        _check(*_case(rng, [2048], [3000], 64, 1, 4, 128, 0, jnp.float16))

    def test_small_step_and_all_padding(self):
        rng = np.random.default_rng(7)
        _check(*_case(rng, [3, 2], [10, 0], 16, 2, 4, 64, 4, jnp.bfloat16))
        q, kc, vc, qs, kv, pt = _case(rng, [0, 0], [0, 0], 16, 2, 4, 64, 70, jnp.bfloat16)
        _check(q, kc, vc, qs, kv, pt)


    @pytest.mark.parametrize("mode", ["prefill", "mixed"])
    def test_step_batch_through_paged_attention_pallas(self, mode):
        """A serving step (a prefill, a chunk on a cached prefix, decodes) through the model's
        attention entry point picks this kernel and matches the reference attention."""
        rng = np.random.default_rng(8)
        ps, d, kv_heads, group, num_pages = 16, 128, 2, 4, 96
        pages = rng.permutation(num_pages)
        chunks, used = [], 0
        for n_new, start in [(140, 0), (70, 300), (1, 15), (1, 16), (1, 400), (9, 0)]:
            need = -(-(start + n_new) // ps)
            chunks.append(SequenceChunk(tokens=list(rng.integers(1, 100, n_new)), start=start,
                                        pages=list(pages[used:used + need])))
            used += need
        buckets = Buckets.for_limits(max_tokens=256, max_seqs=8, max_pages_per_seq=32)
        batch, _ = build_step_batch(chunks, ps, buckets)
        batch = jax.tree_util.tree_map(jnp.asarray, batch)
        shape = (kv_heads, num_pages, ps, d)
        kc = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        vc = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        T = batch.tokens.shape[0]
        q = jnp.asarray(rng.standard_normal((T, kv_heads * group, d)), jnp.bfloat16)
        assert select_prefill_backend(q.dtype, kc.dtype, d, ps, interpret=False) == "mosaic"
        out = paged_attention_pallas(q, kc, vc, batch, 0.1, mode=mode, prefill_backend="mosaic")
        ref = reference_attention(q, kc, vc, batch, 0.1)
        n = int(batch.query_start[-1])
        np.testing.assert_allclose(np.asarray(out[:n], np.float32), np.asarray(ref[:n], np.float32),
                                   atol=BF16_TOL, rtol=BF16_TOL)


def test_auto_backend_takes_mosaic_only_for_large_steps(monkeypatch):
    from arctic_jax.attention import pallas as attention_pallas
    monkeypatch.setattr(attention_pallas, "is_hopper", lambda: True)
    args = (jnp.bfloat16, jnp.bfloat16, 128, 16, False)
    big, small = attention_pallas.MOSAIC_MIN_TOKENS, attention_pallas.MOSAIC_MIN_TOKENS - 1
    assert select_prefill_backend(*args, num_tokens=big) == "mosaic"
    assert select_prefill_backend(*args, num_tokens=small) == "triton"
    assert select_prefill_backend(*args, backend="mosaic", num_tokens=small) == "mosaic"
    assert select_prefill_backend(jnp.bfloat16, jnp.float8_e4m3fn, 128, 16, False,
                                  num_tokens=big) == "triton"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the choice off Hopper")
def test_prefill_backend_choice_off_hopper():
    args = (jnp.bfloat16, jnp.bfloat16, 128, 16)
    assert select_prefill_backend(*args, interpret=True) == "triton"
    assert select_prefill_backend(*args, interpret=False) == "triton"
    with pytest.raises(ValueError, match="Hopper"):
        select_prefill_backend(*args, interpret=False, backend="mosaic")
    with pytest.raises(ValueError, match="unknown prefill backend"):
        select_prefill_backend(*args, interpret=False, backend="cuda")


def test_unsupported_inputs_are_named():
    assert unsupported_reason(jnp.bfloat16, jnp.bfloat16, 128, 16) is None
    assert "float8_e4m3fn" in unsupported_reason(jnp.bfloat16, jnp.float8_e4m3fn, 128, 16)
    assert "bf16 or f16" in unsupported_reason(jnp.float32, jnp.float32, 128, 16)
    assert "head_dim" in unsupported_reason(jnp.bfloat16, jnp.bfloat16, 96, 16)
    assert "page size" in unsupported_reason(jnp.bfloat16, jnp.bfloat16, 128, 24)
    too_big = MosaicPrefillConfig(block_k=128, num_stages=3)
    assert "shared memory" in unsupported_reason(jnp.bfloat16, jnp.bfloat16, 128, 16, too_big)
    assert unsupported_reason(jnp.bfloat16, jnp.bfloat16, 64, 16, too_big) is None
    with pytest.raises(ValueError, match="block_k must be a multiple of 64 up to 256"):
        MosaicPrefillConfig(block_k=320)

    def call(heads, head_dim, config=None):
        kc = jnp.zeros((1, 4, 16, head_dim), jnp.bfloat16)
        ragged_prefill_attention_mgpu(jnp.zeros((8, heads, head_dim), jnp.bfloat16), kc, kc,
                                      jnp.asarray([0, 8]), jnp.asarray([8]),
                                      jnp.zeros((1, 4), jnp.int32), scale=0.1, config=config)
    with pytest.raises(ValueError, match="heads_per_program=3 must divide"):
        call(4, 64, MosaicPrefillConfig(heads_per_program=3))
    with pytest.raises(ValueError, match="head_dim must be 64 or 128"):
        call(2, 256)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="cross-lowering check for the CPU suite")
@pytest.mark.parametrize("head_dim,page_size,config", [
    (128, 16, MosaicPrefillConfig()), (64, 64, MosaicPrefillConfig(block_k=64, num_stages=3)),
    (128, 256, MosaicPrefillConfig()), (64, 16, MosaicPrefillConfig(block_k=256)),
    (128, 64, MosaicPrefillConfig(heads_per_program=1))])
def test_lowers_to_mosaic_gpu_for_cuda(head_dim, page_size, config):
    """Lowers the kernel for CUDA on the CPU: catches Mosaic GPU API, layout and shared-memory
    errors without a GPU (the numbers are checked by the GPU class above)."""
    K, N, P, T, S, MP = 8, 32, 256, 200, 3, 32
    kc = jax.ShapeDtypeStruct((K, P, page_size, head_dim), jnp.bfloat16)

    def i32(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.int32)
    fn = jax.jit(lambda q, k, v, qs, kv, pt: ragged_prefill_attention_mgpu(
        q, k, v, qs, kv, pt, scale=0.1, config=config))
    lowered = fn.trace(jax.ShapeDtypeStruct((T, N, head_dim), jnp.bfloat16), kc, kc, i32(S + 1),
                       i32(S), i32(S, MP)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()

