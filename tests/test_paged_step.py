"""The jitted ragged paged step (models.llama.make_step_fn) on a tiny random Llama, f32.

Prefill, chunked prefill, decode and mixed steps must agree with each other and
with the dense numpy oracle; pages are shuffled and interleaved; padding
writes nothing; the cache is donated; compiles are bounded by the buckets.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.attention.strategy import ContiguousCausalAttention, PagedAttention
from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import ModelConfig, RopeScaling
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import StepOptions, make_step_fn
from arctic_jax.models.llama_weights import random_weights
from helpers import deal_pages
from oracles import llama_forward_dense, rel_err

PS = 4              # page size
NUM_PAGES = 24
SELF_TOL = 1e-5     # between step variants
ORACLE_TOL = 1e-4   # against the float64 oracle
CHUNKS = (3, 5, 2, 7)
SEQ_LEN = sum(CHUNKS)  # 17
BUCKETS = Buckets(tokens=(8, 32), seqs=(1, 4), pages=(8,))

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)
# Tied head, attention and MLP biases, llama3 rope scaling (active at these positions), GQA 4.
VARIANT_CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2,
                          num_heads=4, num_kv_heads=1, head_dim=16, rope_theta=500.0,
                          rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 16),
                          tie_word_embeddings=True, attention_bias=True, mlp_bias=True)


# --------------------------------------------------------------------------- helpers

def random_cache(cfg: ModelConfig, rng: np.random.Generator, num_pages: int = NUM_PAGES) -> KVCache:
    """A cache filled with random non-zero values (stale data must never leak into results)."""
    shape = (cfg.num_kv_heads, num_pages, PS, cfg.head_dim)

    def draw() -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) + 3.0)
    return KVCache(k=tuple(draw() for _ in range(cfg.num_layers)),
                   v=tuple(draw() for _ in range(cfg.num_layers)), page_size=PS)


def run_step(step, weights, cache, chunks, buckets=BUCKETS):
    """One step; returns per-chunk logits [len(wanted), V] (numpy) and the new cache."""
    batch, num_logits = build_step_batch(chunks, PS, buckets)
    logits, cache = step(weights, cache, batch)
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    out, r = [], 0
    for c in chunks:
        n = len(c.wanted())
        out.append(logits[r:r + n])
        r += n
    assert r == num_logits
    return out, cache


def all_logits(tokens, start, pages):
    return SequenceChunk(tokens=list(tokens), start=start, pages=pages,
                         logits_at=list(range(len(tokens))))


def prefill_alone(step, weights, tokens, pages, rng):
    logits, _ = run_step(step, weights, random_cache(CFG, rng), [all_logits(tokens, 0, pages)])
    return logits[0]


def chunked_alone(step, weights, tokens, pages, rng, sizes=CHUNKS):
    cache, start, out = random_cache(CFG, rng), 0, []
    for n in sizes:
        (logits,), cache = run_step(step, weights, cache,
                                    [all_logits(tokens[start:start + n], start, pages)])
        out.append(logits)
        start += n
    assert start == len(tokens)
    return np.concatenate(out)


def decode_alone(step, weights, tokens, pages, rng):
    return chunked_alone(step, weights, tokens, pages, rng, sizes=(1,) * len(tokens))


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block."""
    events = []

    def listener(name, _duration, **_kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def weights():
    # scale 0.15 makes attention distinctly non-uniform on this tiny model
    return random_weights(CFG, jax.random.key(11), scale=0.15)


@pytest.fixture(scope="module")
def step():
    return make_step_fn(CFG)


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(5)
    return [rng.integers(0, CFG.vocab_size, SEQ_LEN) for _ in range(2)]


# --------------------------------------------------------------------------- tests

def test_prefill_chunked_decode_agree_and_match_oracle(step, weights, sequences):
    rng = np.random.default_rng(0)
    for tokens in sequences:
        pages = [int(p) for p in rng.permutation(NUM_PAGES)[:-(-SEQ_LEN // PS)]]
        want = llama_forward_dense(weights, CFG, tokens)
        full = prefill_alone(step, weights, tokens, pages, rng)
        chunked = chunked_alone(step, weights, tokens, pages, rng)
        decoded = decode_alone(step, weights, tokens, pages, rng)
        assert full.shape == (SEQ_LEN, CFG.vocab_size)
        assert rel_err(chunked, full) <= SELF_TOL
        assert rel_err(decoded, full) <= SELF_TOL
        for name, got in (("prefill", full), ("chunked", chunked), ("decode", decoded)):
            assert rel_err(got, want) <= ORACLE_TOL, name


def test_oracle_differs_across_positions(weights, sequences):
    """Guards the comparisons above: a position's logits depend on the tokens before it."""
    a, b = sequences
    la = llama_forward_dense(weights, CFG, a)
    mixed = np.concatenate([b[:8], a[8:]])
    lm = llama_forward_dense(weights, CFG, mixed)
    assert rel_err(lm[8:], la[8:]) > 1e-2


def test_mixed_step_matches_each_sequence_alone(step, weights):
    """Decoding, mid-prefill and starting sequences in one step, on interleaved pages."""
    rng = np.random.default_rng(1)
    # (prefix already cached, tokens in the mixed step)
    plan = [(12, 1),   # decode at the first slot of a new page
            (5, 6),    # chunk crossing a page boundary
            (0, 4),    # starting, exactly one page
            (3, 1)]    # decode into the last slot of the first page
    seqs = [rng.integers(0, CFG.vocab_size, pre + n) for pre, n in plan]
    pages = deal_pages(rng, [-(-len(s) // PS) for s in seqs], NUM_PAGES)
    alone = [prefill_alone(step, weights, s, p, rng) for s, p in zip(seqs, pages, strict=True)]

    cache = random_cache(CFG, rng)
    prefixed = [i for i, (pre, _) in enumerate(plan) if pre]
    chunks = [all_logits(seqs[i][:plan[i][0]], 0, pages[i]) for i in prefixed]
    got, cache = run_step(step, weights, cache, chunks)
    for i, g in zip(prefixed, got, strict=True):
        assert rel_err(g, alone[i][:plan[i][0]]) <= SELF_TOL, f"prefix of sequence {i}"

    chunks = [all_logits(s[pre:pre + n], pre, p) for s, p, (pre, n) in zip(seqs, pages, plan, strict=True)]
    got, cache = run_step(step, weights, cache, chunks)
    for i, (g, (pre, n)) in enumerate(zip(got, plan, strict=True)):
        assert rel_err(g, alone[i][pre:pre + n]) <= SELF_TOL, f"sequence {i}"


def test_interleaved_pages_do_not_interfere(step, weights, sequences):
    """Two sequences on alternating shuffled pages, prefilled then decoded in lock step."""
    rng = np.random.default_rng(2)
    a, b = sequences
    pa, pb = deal_pages(rng, [-(-SEQ_LEN // PS)] * 2, NUM_PAGES)
    alone_a = prefill_alone(step, weights, a, pa, rng)
    alone_b = prefill_alone(step, weights, b, pb, rng)
    cache = random_cache(CFG, rng)
    (ga, gb), cache = run_step(step, weights, cache, [all_logits(a[:6], 0, pa),
                                                      all_logits(b[:9], 0, pb)])
    got_a, got_b = [ga], [gb]
    for t in range(9, SEQ_LEN):   # a decodes three positions behind b
        chunks = [all_logits(a[t - 3:t - 2], t - 3, pa), all_logits(b[t:t + 1], t, pb)]
        (ga, gb), cache = run_step(step, weights, cache, chunks)
        got_a.append(ga)
        got_b.append(gb)
    (ga,), cache = run_step(step, weights, cache, [all_logits(a[SEQ_LEN - 3:], SEQ_LEN - 3, pa)])
    got_a.append(ga)
    assert rel_err(np.concatenate(got_a), alone_a) <= SELF_TOL
    assert rel_err(np.concatenate(got_b), alone_b) <= SELF_TOL


def test_padding_slots_write_nothing(step, weights):
    """Only the real tokens' slots change, and they hold the oracle's K/V."""
    rng = np.random.default_rng(3)
    lens = (7, 4)   # 11 real tokens -> T bucket 32 (21 padding tokens), S bucket 4 (2 padding seqs)
    seqs = [rng.integers(0, CFG.vocab_size, n) for n in lens]
    pages = deal_pages(rng, [-(-n // PS) for n in lens], NUM_PAGES)
    cache = random_cache(CFG, rng)
    before_k = [np.array(x) for x in cache.k]
    before_v = [np.array(x) for x in cache.v]
    chunks = [SequenceChunk(tokens=list(s), start=0, pages=p) for s, p in zip(seqs, pages, strict=True)]
    batch, _ = build_step_batch(chunks, PS, BUCKETS)
    assert (batch.slot_mapping == -1).sum() == 32 - sum(lens)
    _, cache = step(weights, cache, batch)

    real = batch.slot_mapping[batch.slot_mapping >= 0]
    untouched = np.setdiff1d(np.arange(NUM_PAGES * PS), real)
    oracle_kv = [llama_forward_dense(weights, CFG, s, return_kv=True)[1] for s in seqs]
    for layer in range(CFG.num_layers):
        for which, before, after in (("k", before_k, cache.k), ("v", before_v, cache.v)):
            flat_before = before[layer].reshape(CFG.num_kv_heads, -1, CFG.head_dim)
            flat_after = np.asarray(after[layer]).reshape(CFG.num_kv_heads, -1, CFG.head_dim)
            assert np.array_equal(flat_after[:, untouched], flat_before[:, untouched]), \
                f"layer {layer} {which}: slots outside the step changed"
            t = 0
            for s, kv in zip(seqs, oracle_kv, strict=True):
                slots = batch.slot_mapping[t:t + len(s)]
                want = kv[layer][0 if which == "k" else 1]               # [n, K, D]
                got = np.swapaxes(flat_after[:, slots], 0, 1)
                assert rel_err(got, want) <= ORACLE_TOL, f"layer {layer} {which}"
                t += len(s)


def test_step_donates_cache(step, weights):
    rng = np.random.default_rng(4)
    cache = random_cache(CFG, rng)
    old = list(cache.k) + list(cache.v)
    chunks = [SequenceChunk(tokens=list(rng.integers(0, CFG.vocab_size, 3)), start=0, pages=[5])]
    batch, _ = build_step_batch(chunks, PS, BUCKETS)
    _, new_cache = step(weights, cache, batch)
    assert all(x.is_deleted() for x in old)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(weights))
    assert not any(x.is_deleted() for x in new_cache.k + new_cache.v)


def test_compiles_once_per_bucket(weights):
    """Steps of varied real sizes compile one program per distinct bucket, no more."""
    buckets = Buckets(tokens=(6, 12), seqs=(2,), pages=(8,))  # shapes used by no other test
    step = make_step_fn(CFG)
    rng = np.random.default_rng(6)
    cache = random_cache(CFG, rng)
    pa, pb = deal_pages(rng, [8, 6], NUM_PAGES)
    # (tokens of a, tokens of b or 0): real token counts 1..12 over two T buckets
    plan = [(1, 0), (3, 2), (2, 4), (5, 0), (4, 5), (6, 6), (7, 3), (1, 1)]
    starts, shapes = [0, 0], set()
    with count_compiles() as compiles:
        for na, nb in plan:
            chunks = [SequenceChunk(list(rng.integers(0, 256, na)), starts[0], pa)]
            if nb:
                chunks.append(SequenceChunk(list(rng.integers(0, 256, nb)), starts[1], pb))
            starts = [starts[0] + na, starts[1] + nb]
            batch, _ = build_step_batch(chunks, PS, buckets)
            shapes.add(tuple(x.shape for x in jax.tree_util.tree_leaves(batch)))
            logits, cache = step(weights, cache, batch)
            np.asarray(logits)
    assert len(shapes) == 2  # T = 6 and T = 12; S, R and MP fixed
    assert len(compiles) == 2
    if hasattr(step, "_cache_size"):
        assert step._cache_size() == 2


def test_tied_head_biases_llama3_rope_match_oracle():
    """VARIANT_CFG: prefill and decode against the oracle."""
    cfg = VARIANT_CFG
    w = random_weights(cfg, jax.random.key(12), scale=0.15)
    assert w.lm_head is None and w.layers[0].q_bias is not None
    step = make_step_fn(cfg)
    rng = np.random.default_rng(8)
    tokens = rng.integers(0, cfg.vocab_size, 12)
    pages = deal_pages(rng, [3], NUM_PAGES)[0]
    want = llama_forward_dense(w, cfg, tokens)
    cache = random_cache(cfg, rng)
    (full,), _ = run_step(step, w, cache, [all_logits(tokens, 0, pages)])
    assert rel_err(full, want) <= ORACLE_TOL
    cache, dec = random_cache(cfg, rng), []
    for t in range(len(tokens)):
        (g,), cache = run_step(step, w, cache, [all_logits(tokens[t:t + 1], t, pages)])
        dec.append(g)
    assert rel_err(np.concatenate(dec), want) <= ORACLE_TOL


@pytest.mark.parametrize("cfg", [CFG, VARIANT_CFG], ids=["gqa2", "gqa4-tied-biases"])
def test_contiguous_prefill_matches_paged_step_and_writes_the_same_cache(cfg):
    """StepOptions.contiguous_prefill (attention on the step's own K/V) for one fresh
    sequence padded to its bucket: same logits and same cache as the paged step."""
    w = random_weights(cfg, jax.random.key(21), scale=0.15)
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, cfg.vocab_size, 13)          # padded to the 32-token bucket
    pages = deal_pages(rng, [4], NUM_PAGES)[0]
    want = llama_forward_dense(w, cfg, tokens)
    cache = random_cache(cfg, rng)
    paged = make_step_fn(cfg, StepOptions(attention=PagedAttention("reference")))
    contiguous = make_step_fn(cfg, StepOptions(attention=ContiguousCausalAttention("reference")))
    chunk = [all_logits(tokens, 0, pages)]
    buckets = Buckets(tokens=(32,), seqs=(1,), pages=(8,))
    (a,), cache_a = run_step(paged, w, jax.tree_util.tree_map(jnp.copy, cache), chunk, buckets)
    (b,), cache_b = run_step(contiguous, w, cache, chunk, buckets)
    assert rel_err(b, a) <= SELF_TOL
    assert rel_err(b, want) <= ORACLE_TOL
    for x, y in zip(jax.tree_util.tree_leaves(cache_a), jax.tree_util.tree_leaves(cache_b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_fp8_cache_step_is_close_to_the_f32_cache_step(weights, sequences):
    """An fp8 (float8_e4m3fn) cache: prefill then decode logits stay within fp8 rounding of
    the f32-cache step, and differ from it (the cache really holds fp8)."""
    rng = np.random.default_rng(13)
    tokens = sequences[0]
    pages = deal_pages(rng, [-(-SEQ_LEN // PS)], NUM_PAGES)[0]
    step = make_step_fn(CFG)
    out = {}
    for dtype in (jnp.float32, jnp.float8_e4m3fn):
        cache = KVCache.allocate(CFG, NUM_PAGES, PS, dtype)
        (pre,), cache = run_step(step, weights, cache, [all_logits(tokens[:12], 0, pages)])
        dec = []
        for t in range(12, SEQ_LEN):
            (g,), cache = run_step(step, weights, cache, [all_logits(tokens[t:t + 1], t, pages)])
            dec.append(g)
        assert cache.k[0].dtype == dtype
        out[dtype] = np.concatenate([pre] + dec)
    # e4m3 keeps 3 mantissa bits (element error up to 6.25%); on this tiny, sharp model the
    # logits move ~9%, while logits of another sequence differ by ~100%.
    err = rel_err(out[jnp.float8_e4m3fn], out[jnp.float32])
    assert 1e-4 < err < 0.15, err
    assert rel_err(out[jnp.float32][::-1], out[jnp.float32]) > 0.5


def test_fp8_cache_writes_saturate_instead_of_nan():
    from arctic_jax.kv_cache import write_kv

    cache = jnp.zeros((1, 2, 2, 4), jnp.float8_e4m3fn)
    big = jnp.array([[[1000.0, -1000.0, 3.0, -0.5]]], jnp.float32)     # [T=1, K=1, D=4]
    k, _ = write_kv(cache, cache, big, big, jnp.array([1], jnp.int32))
    np.testing.assert_array_equal(np.asarray(k[0, 0, 1], np.float32), [448.0, -448.0, 3.0, -0.5])


def _to_torch_llama(weights, cfg: ModelConfig):
    """transformers' LlamaForCausalLM (float64) holding ``weights``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    rs = cfg.rope_scaling
    rope = {"rope_type": rs.rope_type, "rope_theta": cfg.rope_theta}
    if rs.rope_type == "llama3":
        rope.update(factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias)
    model = LlamaForCausalLM(hf_cfg).to(torch.float64).eval()
    H = cfg.hidden_size

    def t(x) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x, np.float64).copy())
    sd = {"model.embed_tokens.weight": t(weights.embed), "model.norm.weight": t(weights.final_norm)}
    if weights.lm_head is not None:
        sd["lm_head.weight"] = t(np.asarray(weights.lm_head).T)
    for i, lw in enumerate(weights.layers):
        pre = f"model.layers.{i}."
        kv = np.asarray(lw.kv_proj)
        gu = np.asarray(lw.gate_up)
        sd.update({
            pre + "input_layernorm.weight": t(lw.input_norm),
            pre + "post_attention_layernorm.weight": t(lw.post_norm),
            pre + "self_attn.q_proj.weight": t(np.asarray(lw.q_proj).reshape(H, -1).T),
            pre + "self_attn.k_proj.weight": t(kv[:, 0].reshape(H, -1).T),
            pre + "self_attn.v_proj.weight": t(kv[:, 1].reshape(H, -1).T),
            pre + "self_attn.o_proj.weight": t(np.asarray(lw.o_proj).reshape(-1, H).T),
            pre + "mlp.gate_proj.weight": t(gu[:, 0].T),
            pre + "mlp.up_proj.weight": t(gu[:, 1].T),
            pre + "mlp.down_proj.weight": t(np.asarray(lw.down).T),
        })
        if lw.q_bias is not None:
            kvb = np.asarray(lw.kv_bias)
            sd.update({
                pre + "self_attn.q_proj.bias": t(np.asarray(lw.q_bias).reshape(-1)),
                pre + "self_attn.k_proj.bias": t(kvb[0].reshape(-1)),
                pre + "self_attn.v_proj.bias": t(kvb[1].reshape(-1)),
                pre + "self_attn.o_proj.bias": t(lw.o_bias)})
        if lw.gate_up_bias is not None:
            gub = np.asarray(lw.gate_up_bias)
            sd.update({pre + "mlp.gate_proj.bias": t(gub[0]), pre + "mlp.up_proj.bias": t(gub[1]),
                       pre + "mlp.down_proj.bias": t(lw.down_bias)})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing   # tied head shares embed_tokens
    return model


@pytest.mark.parametrize("which", ["base", "variant"])
def test_oracle_matches_transformers(which, weights):
    """The numpy oracle itself against transformers' PyTorch Llama (float64)."""
    import torch

    cfg = CFG if which == "base" else VARIANT_CFG
    w = weights if which == "base" else random_weights(cfg, jax.random.key(12), scale=0.15)
    tokens = np.random.default_rng(9).integers(0, cfg.vocab_size, 14)
    model = _to_torch_llama(w, cfg)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)[None]).logits[0].numpy()
    # transformers computes the rope angles in float32 even in a float64 model
    assert rel_err(llama_forward_dense(w, cfg, tokens), want) <= 1e-5


def _batch_oracle(chunks, page_size, T, S, MP, R):
    """Per-chunk loop construction of the StepBatch arrays (the test's own oracle)."""
    out = dict(tokens=np.zeros(T), positions=np.zeros(T), slot_mapping=np.full(T, -1),
               seq_ids=np.zeros(T), page_tables=np.zeros((S, MP)), query_start=np.zeros(S + 1),
               kv_lens=np.zeros(S), logits_indices=np.zeros(R))
    t = r = 0
    for s, c in enumerate(chunks):
        for j, tok in enumerate(c.tokens):
            p = c.start + j
            out["tokens"][t + j], out["positions"][t + j], out["seq_ids"][t + j] = tok, p, s
            out["slot_mapping"][t + j] = c.pages[p // page_size] * page_size + p % page_size
        need = -(-(c.start + len(c.tokens)) // page_size)
        out["page_tables"][s, :need] = c.pages[:need]
        out["kv_lens"][s] = c.start + len(c.tokens)
        for i in c.wanted():
            out["logits_indices"][r] = t + i
            r += 1
        t += len(c.tokens)
        out["query_start"][s + 1:] = t
    return out


def test_build_step_batch_matches_a_per_chunk_construction():
    rng = np.random.default_rng()
    for _ in range(20):
        n_seq = int(rng.integers(1, 5))
        chunks = []
        for _s in range(n_seq):
            n, start = int(rng.integers(1, 9)), int(rng.integers(0, 20))
            pages = [int(p) for p in rng.permutation(40)[:-(-(start + n) // PS) + int(rng.integers(0, 3))]]
            logits_at = None if rng.random() < 0.5 else sorted({int(i) for i in rng.integers(0, n, 2)})
            chunks.append(SequenceChunk(tokens=[int(x) for x in rng.integers(0, 99, n)], start=start,
                                        pages=pages, logits_at=logits_at))
        buckets = Buckets(tokens=(8, 32, 64), seqs=(4, 8), pages=(8,))
        batch, _ = build_step_batch(chunks, PS, buckets)
        want = _batch_oracle(chunks, PS, batch.tokens.shape[0], batch.page_tables.shape[0], 8,
                             batch.logits_indices.shape[0])
        for name, value in want.items():
            np.testing.assert_array_equal(getattr(batch, name), value.astype(np.int32), name)


@pytest.mark.parametrize("chunk,match", [
    (SequenceChunk(tokens=[], start=0, pages=[0]), "no tokens"),
    (SequenceChunk(tokens=[1], start=-1, pages=[0]), "negative position"),
    (SequenceChunk(tokens=[1] * 5, start=0, pages=[0]), "needs 2 pages for 5 positions, has 1"),
    (SequenceChunk(tokens=[1], start=0, pages=[-3]), r"negative page ids \[-3\]"),
    (SequenceChunk(tokens=[1, 2], start=0, pages=[0], logits_at=[2]), "logits index 2 outside"),
])
def test_build_step_batch_rejects_bad_chunks(chunk, match):
    ok = SequenceChunk(tokens=[5], start=3, pages=[1])
    with pytest.raises(ValueError, match=match):
        build_step_batch([ok, chunk], PS, Buckets(tokens=(8,), seqs=(2,), pages=(4,)))
