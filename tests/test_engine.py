"""Continuous-batching engine on a tiny random model: batching, preemption, pages, prefix cache,
compile counts. Outputs are checked against each request run alone (greedy) and against a
direct greedy loop over the model step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.engine.compile_counter import CompileCounter
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import make_step_fn
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingParams
from helpers import TINY_ENGINE_CFG, CharTokenizer

CFG = TINY_ENGINE_CFG


@pytest.fixture(scope="module")
def weights():
    # Larger weights so greedy outputs depend strongly on the context.
    return random_weights(CFG, jax.random.PRNGKey(7), scale=0.3)


@pytest.fixture
def preemptions(monkeypatch):
    """Counts Scheduler._preempt calls during a test."""
    from arctic_jax.engine import scheduler as sched_mod

    count = {"n": 0}
    original = sched_mod.Scheduler._preempt

    def counting(self, request):
        count["n"] += 1
        return original(self, request)

    monkeypatch.setattr(sched_mod.Scheduler, "_preempt", counting)
    return count


def make_engine(weights, **kw):
    base = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, page_size=4,
                num_pages=96, token_buckets=(8, 16, 32), page_buckets=(32,))
    base.update(kw)
    return LLMEngine(LLAMA, CFG, weights, CharTokenizer(), EngineConfig(**base))


def run_all(engine, prompts, params):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    tokens = {i: [] for i in ids}
    reasons = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason.value
    assert not engine.has_unfinished()
    return [tokens[i] for i in ids], [reasons[i] for i in ids]


def greedy_reference(weights, prompt, n):
    """Direct greedy loop over the model step, one sequence, contiguous pages."""
    step = make_step_fn(CFG)
    cache = KVCache.allocate(CFG, 40, 4, jnp.float32)
    buckets = Buckets.for_limits(128, 1, 40)
    pages = list(range(40))
    batch, _ = build_step_batch([SequenceChunk(prompt, 0, pages)], 4, buckets)
    logits, cache = step(weights, cache, batch)
    out = [int(np.argmax(logits[0]))]
    while len(out) < n:
        pos = len(prompt) + len(out) - 1
        batch, _ = build_step_batch([SequenceChunk([out[-1]], pos, pages)], 4, buckets)
        logits, cache = step(weights, cache, batch)
        out.append(int(np.argmax(logits[0])))
    return out


def random_prompts(rng, n, lo=3, hi=40):
    return [list(rng.integers(0, CFG.vocab_size, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def test_engine_matches_direct_greedy_loop(weights):
    rng = np.random.default_rng(0)
    prompt = random_prompts(rng, 1, 20, 30)[0]
    engine = make_engine(weights)
    (tokens,), (reason,) = run_all(engine, [prompt], [SamplingParams(max_tokens=12, temperature=0)])
    assert reason == "length"
    assert tokens == greedy_reference(weights, prompt, 12)


def test_concurrent_requests_equal_alone_and_pages_freed(weights):
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 12)
    lengths = [int(x) for x in rng.integers(1, 14, size=len(prompts))]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in lengths]
    engine = make_engine(weights)
    together, _ = run_all(engine, prompts, params)
    solo_engine = make_engine(weights, enable_prefix_caching=False)
    for p, sp, got in zip(prompts, params, together, strict=True):
        alone, _ = run_all(solo_engine, [p], [sp])
        assert got == alone[0]
        assert len(got) == sp.max_tokens
    alloc = engine.scheduler.allocator
    alloc.check_invariants()
    assert alloc.usage() == 0.0


def test_preemption_with_tiny_page_pool(weights, preemptions):
    rng = np.random.default_rng(2)
    prompts = random_prompts(rng, 6, 10, 20)
    params = [SamplingParams(max_tokens=20, temperature=0)] * len(prompts)
    expected, _ = run_all(make_engine(weights, enable_prefix_caching=False), prompts, params)
    # 14 pages of 4 tokens cannot hold 6 sequences of up to 40 tokens at once.
    engine = make_engine(weights, num_pages=14, max_model_len=48, enable_prefix_caching=False)
    preemptions["n"] = 0
    got, reasons = run_all(engine, prompts, params)
    assert preemptions["n"] > 0
    assert engine.metrics.preemptions._value.get() == preemptions["n"]   # the /metrics counter
    assert got == expected
    assert reasons == ["length"] * len(prompts)
    assert engine.metrics.finished.labels("length")._value.get() == len(prompts)
    assert engine.scheduler.allocator.usage() == 0.0
    engine.scheduler.allocator.check_invariants()


def test_prefix_cache_hit_gives_identical_output(weights):
    rng = np.random.default_rng(4)
    system = list(rng.integers(0, CFG.vocab_size, size=22))
    prompts = [system + list(rng.integers(0, CFG.vocab_size, size=5)) for _ in range(3)]
    params = [SamplingParams(max_tokens=8, temperature=0)] * 3
    cold, _ = run_all(make_engine(weights, enable_prefix_caching=False), prompts, params)
    engine = make_engine(weights)
    warm = [run_all(engine, [p], [params[0]])[0][0] for p in prompts]
    assert warm == cold
    stats = engine.scheduler.allocator.stats()
    assert stats["hit_tokens"] >= 2 * 20  # second and third requests reuse 5 full pages each


def test_seeded_sampling_independent_of_batch(weights):
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng, 5)
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=100 + i)
              for i in range(5)]
    together, _ = run_all(make_engine(weights), prompts, params)
    alone = run_all(make_engine(weights), [prompts[3]], [params[3]])[0][0]
    assert together[3] == alone
    again, _ = run_all(make_engine(weights), prompts, params)
    assert again == together


def test_seeded_request_same_under_every_sampling_mode(weights):
    """A temperature-only request runs in RANDOM mode alone and in FILTERED mode next to
    a top-k request: its tokens must not depend on the step's mode."""
    rng = np.random.default_rng(8)
    prompts = random_prompts(rng, 3)
    plain = SamplingParams(max_tokens=12, temperature=1.0, min_p=0.05, seed=41)
    params = [plain, SamplingParams(max_tokens=12, temperature=0.8, top_k=5, seed=3),
              SamplingParams(max_tokens=12, temperature=0.0)]
    alone = run_all(make_engine(weights), [prompts[0]], [plain])[0][0]
    together, _ = run_all(make_engine(weights), prompts, params)
    assert together[0] == alone
    greedy = run_all(make_engine(weights), [prompts[2]], [params[2]])[0][0]
    assert together[2] == greedy


def test_no_compilation_after_warmup(weights):
    counter = CompileCounter()
    engine = make_engine(weights, num_pages=83,  # a cache shape no other test compiles
                         contiguous_prefill_min_tokens=16)
    engine.runner.warmup(progress=False)
    compiled = counter.count
    assert compiled >= len(engine.runner.buckets.tokens)  # the counter does see compiles
    counter.count = 0
    rng = np.random.default_rng(6)
    prompts = random_prompts(rng, 10, 2, 60)
    kinds = [dict(temperature=0.0), dict(temperature=0.7, seed=1), dict(temperature=0.9, top_p=0.8),
             dict(temperature=0.0, frequency_penalty=0.5), dict(temperature=0.7, logit_bias={3: 2.0}),
             dict(temperature=0.9, top_p=0.8, repetition_penalty=1.3, presence_penalty=0.2)]
    params = [SamplingParams(max_tokens=int(n), **kinds[i % 6])   # every sampling mode, penalties
              for i, n in enumerate(rng.integers(1, 30, size=10))]
    run_all(engine, prompts, params)
    alone = random_prompts(rng, 1, 20, 30)   # a prompt alone: its first chunk is contiguous
    run_all(engine, alone, [SamplingParams(max_tokens=3)])
    assert engine.runner.num_contiguous_steps >= 1
    assert counter.count == 0
    counter.active = False


def test_background_compilation_holds_steps_to_compiled_buckets(weights):
    """Warm-up compiles only the 8-token steps; the 16- and 32-token programs compile in a
    background thread. Meanwhile every step stays within 8 tokens (counted in the metrics),
    no step compiles anything (compiles are counted per thread), and the outputs equal a
    plain engine's."""
    import threading

    engine = make_engine(weights, num_pages=85)   # a cache shape no other test compiles
    runner = engine.runner
    runner.warmup(progress=False, upto_tokens=8)
    in_steps = []

    def on_compile(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and \
                threading.current_thread() is threading.main_thread():
            in_steps.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    release = threading.Event()
    compile_unit = runner.compile_unit
    runner.compile_unit = lambda unit: (release.wait(120), compile_unit(unit))
    dispatched = []
    dispatch = runner.dispatch
    runner.dispatch = lambda step, draft=False: (
        dispatched.append((step.num_tokens, runner.token_cap())), dispatch(step, draft))[1]
    try:
        runner.compile_in_background(8)
        rng = np.random.default_rng(12)
        prompts = random_prompts(rng, 4, 20, 40)   # longer than one 8-token step
        params = [SamplingParams(max_tokens=6, temperature=0.0)] * 4
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        tokens = {i: [] for i in ids}
        for _ in range(5):   # the bigger programs are held back: every step is capped
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
        assert dispatched and all(n <= 8 and cap == 8 for n, cap in dispatched)
        assert engine.metrics.steps_waiting_for_compilation._value.get() >= 5
        release.set()
        runner.background.join(300)
        assert runner.background.done and runner.background.error is None
        assert runner.token_cap() is None
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
        assert max(n for n, _ in dispatched) > 8   # full-size steps once compiled
        assert in_steps == []
    finally:
        release.set()
        jax.monitoring.unregister_event_duration_listener(on_compile)
    expected, _ = run_all(make_engine(weights), prompts, params)
    assert [tokens[i] for i in ids] == expected


def test_abort_frees_pages(weights):
    engine = make_engine(weights)
    rid = engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=50, temperature=0))
    for _ in range(4):
        engine.step()
    assert engine.scheduler.allocator.usage() > 0
    assert engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.allocator.usage() == 0.0


def test_stop_token_and_bad_requests(weights):
    rng = np.random.default_rng(8)
    prompt = random_prompts(rng, 1, 10, 12)[0]
    free_run, _ = run_all(make_engine(weights), [prompt], [SamplingParams(max_tokens=10, temperature=0)])
    stop_tok = free_run[0][4]
    first = free_run[0].index(stop_tok)
    got, reasons = run_all(make_engine(weights), [prompt],
                           [SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_tok,))])
    assert got[0] == free_run[0][:first + 1]
    assert reasons == ["stop"]
    engine = make_engine(weights)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request([5] * 130, SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request([CFG.vocab_size + 3], SamplingParams())


def test_preemption_with_prefix_caching_gives_the_same_outputs(weights, preemptions):
    rng = np.random.default_rng(9)
    system = list(rng.integers(0, CFG.vocab_size, size=9))
    prompts = [system + list(rng.integers(0, CFG.vocab_size, size=int(n)))
               for n in rng.integers(2, 10, size=6)]
    params = [SamplingParams(max_tokens=20, temperature=0)] * len(prompts)
    expected, _ = run_all(make_engine(weights, enable_prefix_caching=False), prompts, params)
    preemptions["n"] = 0
    engine = make_engine(weights, num_pages=14, max_model_len=48)
    got, _ = run_all(engine, prompts, params)
    assert preemptions["n"] > 0
    assert got == expected
    assert engine.scheduler.allocator.usage() == 0.0
    engine.scheduler.allocator.check_invariants()


def test_fp8_kv_cache_engine(weights):
    """--kv-cache-dtype fp8: the cache holds float8_e4m3fn, requests complete, pages are
    freed, and a bad name fails at configuration time."""
    engine = make_engine(weights, kv_cache_dtype="fp8")
    assert {x.dtype for x in jax.tree_util.tree_leaves(engine.runner.cache)} == {
        jnp.dtype(jnp.float8_e4m3fn)}
    rng = np.random.default_rng(12)
    prompts = random_prompts(rng, 6)
    tokens, reasons = run_all(engine, prompts, [SamplingParams(max_tokens=7, temperature=0)] * 6)
    assert reasons == ["length"] * 6 and all(len(t) == 7 for t in tokens)
    assert engine.scheduler.allocator.usage() == 0.0
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp4'"):
        EngineConfig(kv_cache_dtype="fp4")


def test_impossible_limits_fail_at_start(weights):
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        make_engine(weights, num_pages=8, max_model_len=128)  # 8 x 4 tokens < 128
    with pytest.raises(ValueError, match="token_buckets"):
        make_engine(weights, token_buckets=(8, 16))  # max_num_batched_tokens is 32
    with pytest.raises(ValueError, match="page_buckets"):
        make_engine(weights, page_buckets=(8,))  # 128 / 4 = 32 pages per sequence


def test_background_compiler_stops_between_programs():
    """``stop`` lets the program being compiled finish, compiles nothing more, and returns once
    the thread has ended (a process must not exit while XLA compiles in a thread)."""
    import threading

    from arctic_jax.engine.background_compile import BackgroundCompiler

    started, release, seen = threading.Event(), threading.Event(), []

    def compile_unit(unit):
        seen.append(unit)
        started.set()
        release.wait(30)

    bg = BackgroundCompiler([16, 16, 32, 32], compile_unit, lambda u: u, ready_from=8).start()
    assert started.wait(30)
    threading.Timer(0.2, release.set).start()
    bg.stop()
    assert not bg._thread.is_alive() and seen == [16] and bg.pending == 3
    assert bg.ready_tokens == 8 and not bg.done   # steps stay capped
