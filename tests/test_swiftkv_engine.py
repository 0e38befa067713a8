"""A SwiftKV model (AcrossKV g = 2, biases, tied head, GQA 4) served by the engine, on 8 simulated
CPU devices: greedy output equals a greedy loop over the float64 oracle with chunked prefill and
the prefix cache; equals the single-device engine under TP = 8, SP = 8 and shift (SP 4 x TP 2)
with steps switching variants; stays the same with preemption and with n-gram, suffix-tree and
Arctic draft-model speculation (verify rows are logits rows; the draft reads SwiftKV's hidden
rows); warm-up compiles every shape, serving none; SP programs gather rows, not tokens.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.engine.compile_counter import CompileCounter
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.sampling import SamplingParams
from oracles import swiftkv_forward_hf
from test_engine import CharTokenizer, run_all
from test_shift_engine import assert_shifts, make_waves, record_variants, serve
from test_swiftkv import config_dict, hf_tensors, write_checkpoint

THRESHOLD = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF tensors, loaded model) of a 5-layer SwiftKV checkpoint: Lkv = 1, g = 2, vocab 97."""
    from checkpoints import load_model

    d = {**config_dict("across2_bias"), "vocab_size": 97}
    tensors = hf_tensors(d, np.random.default_rng(17))
    path = write_checkpoint(tmp_path_factory.mktemp("swiftkv"), d, tensors)
    loaded = load_model(path, dtype=jnp.float32, progress=False, use_cache=False)
    assert loaded.config.num_cache_layers == 3     # 1 + 4 / 2
    return tensors, loaded


def make_engine(model, **kw):
    base = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, page_size=4,
                num_pages=96, token_buckets=(8, 16, 32), page_buckets=(32,),
                attention_impl="reference")
    base.update(kw)
    _, m = model
    return LLMEngine(m.spec, m.config, m.weights, CharTokenizer(), EngineConfig.from_flags(**base))


def oracle_greedy(tensors, cfg, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        logits = swiftkv_forward_hf(tensors, cfg, tokens)[-1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] > 1e-4, "a near-tie: pick another seed"
        tokens.append(int(np.argmax(logits)))
    return tokens[len(prompt):]


def test_engine_greedy_equals_the_oracle_with_chunked_prefill_and_prefix_cache(model):
    tensors, m = model
    rng = np.random.default_rng(3)
    shared = [int(t) for t in rng.integers(0, 97, 12)]
    prompts = [shared + [int(t) for t in rng.integers(0, 97, n)] for n in (9, 3, 14)]
    prompts.append([int(t) for t in rng.integers(0, 97, 27)])
    engine = make_engine(model, max_num_batched_tokens=16, max_num_seqs=2)
    outs, _ = run_all(engine, prompts, [SamplingParams(max_tokens=7, temperature=0)] * 4)
    for prompt, got in zip(prompts, outs, strict=True):
        assert got == oracle_greedy(tensors, m.config, prompt, 7)
    assert engine.scheduler.allocator.stats()["hit_rate"] > 0


@pytest.fixture(scope="module")
def waves():
    return make_waves(1)


@pytest.fixture(scope="module")
def single_device(model, waves):
    return serve(make_engine(model), waves)


@pytest.mark.parametrize("layout", [dict(parallel_mode="tp", tensor_parallel_size=8),
                                    dict(parallel_mode="sp", sequence_parallel_size=8),
                                    dict(parallel_mode="shift", sequence_parallel_size=4,
                                         tensor_parallel_size=2,
                                         shift_parallel_threshold=THRESHOLD)],
                         ids=["tp8", "sp8", "shift-sp4tp2"])
def test_parallel_engines_equal_one_device(model, waves, single_device, layout):
    engine = make_engine(model, **layout)
    used = record_variants(engine)
    assert serve(engine, waves) == single_device
    if layout["parallel_mode"] == "shift":
        assert_shifts(used, THRESHOLD)
    for x in engine.runner.cache.k + engine.runner.cache.v:
        assert x.sharding == engine.runner.deployment.cache_sharding


def _repeating_prompts(seed, n=5):
    rng = np.random.default_rng(seed)
    motif = [int(t) for t in rng.integers(0, 97, 6)]
    return [motif * 3 + [int(t) for t in rng.integers(0, 97, 4)] for _ in range(n)]


@pytest.mark.parametrize("speculative", [
    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
    {"method": "suffix", "num_speculative_tokens": 4, "suffix_use_tree_spec": True},
], ids=["ngram", "suffix-tree"])
def test_speculation_with_preemption_keeps_greedy_output(model, speculative):
    """Drafts verified on SwiftKV's logits rows (chains and token trees), in a pool small
    enough to preempt: the same tokens as plain greedy decoding, no page leaked."""
    prompts = _repeating_prompts(4)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * len(prompts)
    want, _ = run_all(make_engine(model), prompts, params)
    engine = make_engine(model, speculative_config=speculative, num_pages=24, max_num_seqs=4,
                         max_model_len=64)
    preempted = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda r: (preempted.append(r.request_id), original(r))[1]
    got, _ = run_all(engine, prompts, params)
    assert got == want
    assert preempted, "the pool was meant to force preemption"
    assert engine.spec_stats.num_draft_steps > 0 and engine.spec_stats.num_accepted > 0
    allocator = engine.scheduler.allocator
    allocator.check_invariants()
    assert allocator.num_free() == allocator.num_allocatable


def test_warmup_compiles_and_serving_does_not(model):
    counter = CompileCounter()
    try:
        engine = make_engine(model, num_pages=83, speculative_config={  # a cache shape of its own
            "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
        engine.runner.warmup(progress=False)
        assert counter.count > 0
        counter.count = 0
        prompts = _repeating_prompts(5, 6)
        kinds = [dict(temperature=0.0), dict(temperature=0.9, seed=3)]
        run_all(engine, prompts, [SamplingParams(max_tokens=16, **kinds[i % 2]) for i in range(6)])
        assert engine.spec_stats.num_draft_steps > 0
        assert counter.count == 0
    finally:
        counter.close()


@pytest.mark.parametrize("layout", ["sp8", "sp4tp2"])
def test_sp_program_gathers_rows_not_tokens(layout):
    """The SP variant's collectives (compiled HLO): the cache never moves; tokens are never
    all-gathered (the early layers and the K/V fan-out use all-to-all); the logits rows reach the
    later layers through one [R, H] all-reduce after layer Lkv - 1."""
    import jax

    from arctic_jax.attention.strategy import PagedAttention
    from arctic_jax.engine.programs import jit_forward
    from arctic_jax.models.registry import SWIFTKV
    from arctic_jax.models.swiftkv_config import SwiftKVConfig
    from sharding.deployment import Deployment
    from test_shift_parallel import BUCKETS, LAYOUTS, NUM_PAGES, PS, cache_moves, collectives, make_scenario

    cfg = SwiftKVConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
                        num_heads=8, num_kv_heads=2, head_dim=16, num_key_value_layers=2,
                        key_value_group_size=2)
    dep = Deployment.create(cfg, SWIFTKV.random_weights(cfg, jax.random.key(0)), LAYOUTS[layout])
    cache = dep.allocate_cache(NUM_PAGES, PS, jnp.float32)
    assert len(cache.k) == 3
    batch = make_scenario(cfg.vocab_size, 0).batches[0]
    hlo = jit_forward(SWIFTKV, dep, "sp", PagedAttention()).lower(
        dep.weights["sp"], cache, batch).compile().as_text()
    found = collectives(hlo)
    T, R, H = BUCKETS.tokens[0], batch.logits_indices.shape[0], cfg.hidden_size
    assert cache_moves(hlo, cache) == []
    assert [op for op, shapes in found if op.startswith("all-gather")
            and any(s[0] == T for s in shapes)] == []
    assert any(op.startswith("all-to-all") for op, _ in found)
    assert any(op.startswith("all-reduce") and (R, H) in shapes for op, shapes in found)


def test_across_kv_grows_the_page_pool(monkeypatch):
    """At a fixed memory fraction, Llama-3.1-8B's shape with Lkv = 16 and AcrossKV g = 4 keeps
    16 + 16 / 4 = 20 cache layers instead of 32: 1.6x the pages (and concurrent sequences)."""
    import dataclasses

    from arctic_jax.config import llama_3_1_8b
    from arctic_jax.engine import config as engine_config
    from arctic_jax.models.swiftkv_config import SwiftKVConfig

    monkeypatch.setattr(engine_config, "_device_free_bytes", lambda n=1: 40 << 30)
    base = llama_3_1_8b()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    ec = EngineConfig(page_size=16, max_model_len=4096, kv_cache_memory_fraction=0.5)
    pages = {g: engine_config.resolve_scheduler_config(
        SwiftKVConfig(**fields, num_key_value_layers=16, key_value_group_size=g), ec,
        jnp.bfloat16).num_pages for g in (1, 4)}
    llama = engine_config.resolve_scheduler_config(base, ec, jnp.bfloat16).num_pages
    assert pages[1] == llama                # SwiftKV alone keeps every layer's cache
    assert pages[4] == (20 << 30) // (2 * 20 * 8 * 16 * 128 * 2)
    assert pages[4] / llama == pytest.approx(32 / 20, rel=1e-3)


def test_arctic_draft_model_reads_swiftkv_hidden_rows(model, tmp_path):
    """An Arctic MLP speculator fed by SwiftKV's final hidden rows (a draft that always proposes
    the plain output's most common token): accepted on its runs, greedy output unchanged."""
    from test_arctic_speculation import constant_draft, draft_cfg, write_draft

    _, m = model
    prompts = _repeating_prompts(6, 4)
    params = [SamplingParams(max_tokens=32, temperature=0)] * len(prompts)
    want, _ = run_all(make_engine(model), prompts, params)
    common = int(np.bincount(np.concatenate(want), minlength=97).argmax())
    cfg = draft_cfg("mlp", base=m.config)
    path = write_draft(tmp_path, "mlp", cfg, constant_draft(cfg, common))
    engine = make_engine(model, speculative_config={"method": "arctic", "model": path})
    got, _ = run_all(engine, prompts, params)
    assert got == want
    s = engine.spec_stats
    assert s.num_draft_steps > 10 and 0 < s.num_accepted < s.num_drafted
