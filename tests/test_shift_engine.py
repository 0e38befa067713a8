"""Shift parallelism in the engine, on 8 simulated CPU devices and a tiny random model.

Requests arrive in waves, so steps go back and forth between prefill-heavy (SP
variant) and decode-only (TP variant). Greedy outputs must equal the
single-device engine's, for shift and for static TP=8 / SP=8; serving after
warm-up compiles nothing; "auto" calibrates the threshold at warm-up.
"""
from __future__ import annotations

import itertools
import re

import jax
import numpy as np
import pytest

from arctic_jax.engine.compile_counter import CompileCounter
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingParams
from test_engine import CFG, CharTokenizer, random_prompts, run_all

THRESHOLD = 8
TOKEN_BUCKETS = (8, 16, 32)


@pytest.fixture(scope="module")
def weights():
    # Large weights so that greedy outputs depend strongly on the context.
    return random_weights(CFG, jax.random.PRNGKey(7), scale=0.3)


def make_engine(weights, **kw):
    base = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, page_size=4,
                num_pages=96, token_buckets=TOKEN_BUCKETS, page_buckets=(32,))
    base.update(kw)
    return LLMEngine(LLAMA, CFG, weights, CharTokenizer(), EngineConfig.from_flags(**base))


def make_waves(seed):
    """(step index at which to add, prompt, params): three waves of three long prompts (SP
    prefill), and short prompts that join running decodes in small mixed (TP) steps."""
    rng = np.random.default_rng(seed)
    waves = []
    for at, n, lo, hi in ((0, 3, 10, 40), (10, 3, 10, 40), (15, 1, 2, 4), (22, 3, 10, 40),
                          (27, 1, 2, 4)):
        for prompt in random_prompts(rng, n, lo, hi):
            waves.append((at, prompt, SamplingParams(max_tokens=int(rng.integers(6, 16)),
                                                     temperature=0)))
    return waves


def serve(engine, waves):
    """Run the waves to completion; returns each request's tokens, in wave order."""
    pending = list(waves)
    ids, tokens, step = [], {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, params = pending.pop(0)
            ids.append(engine.add_request(prompt, params))
            tokens[ids[-1]] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        step += 1
        assert step < 1000
    out = [tokens[i] for i in ids]
    assert [len(t) for t in out] == [p.max_tokens for _, _, p in waves]
    return out


def record_variants(engine):
    """Wrap the runner's dispatch to log (scheduled tokens, variant) of every step."""
    used, dispatch = [], engine.runner.dispatch

    def logged(step, *args):
        packed, variant = dispatch(step, *args)
        used.append((step.num_tokens, variant))
        return packed, variant

    engine.runner.dispatch = logged
    return used


def steps_by_variant(engine) -> dict[str, float]:
    text = engine.metrics.render().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^arctic_engine_steps_total\{variant="(\w+)"\} (\S+)$', text, re.M)}


def assert_shifts(used, threshold):
    """Each step ran the variant its size calls for, and the engine went back and forth."""
    for n, variant in used:
        assert variant == ("tp" if n <= threshold else "sp"), (n, variant)
    seq = [v for _, v in used]
    switches = sum(a != b for a, b in itertools.pairwise(seq))
    assert switches >= 3, seq


@pytest.fixture(scope="module")
def waves():
    return make_waves(0)


@pytest.fixture(scope="module")
def single_device_outputs(weights, waves):
    engine = make_engine(weights)
    assert engine.runner.deployment.variants == ("single",)
    return serve(engine, waves)


def test_shift_engine_matches_single_device(weights, waves, single_device_outputs):
    engine = make_engine(weights, parallel_mode="shift", sequence_parallel_size=4,
                         tensor_parallel_size=2, shift_parallel_threshold=THRESHOLD)
    runner = engine.runner
    assert runner.variants == ("tp", "sp") and runner.shift_threshold == THRESHOLD
    used = record_variants(engine)
    assert serve(engine, waves) == single_device_outputs
    assert_shifts(used, THRESHOLD)
    counts = steps_by_variant(engine)
    assert counts.get("tp", 0) > 0 and counts.get("sp", 0) > 0
    assert counts == {v: float(sum(u == v for _, u in used)) for v in ("tp", "sp")}
    cache = runner.cache
    for x in cache.k + cache.v:
        assert x.sharding == runner.deployment.cache_sharding
    engine.scheduler.allocator.check_invariants()
    assert engine.scheduler.allocator.usage() == 0.0


@pytest.mark.parametrize("sp,tp,mode", [(1, 8, "tp"), (8, 1, "sp")])
def test_static_parallel_engines_match_single_device(weights, waves, single_device_outputs,
                                                     sp, tp, mode):
    engine = make_engine(weights, parallel_mode=mode, sequence_parallel_size=sp,
                         tensor_parallel_size=tp)
    assert engine.runner.variants == (mode,)
    used = record_variants(engine)
    assert serve(engine, waves) == single_device_outputs
    assert {v for _, v in used} == {mode}
    assert steps_by_variant(engine) == {mode: float(len(used))}


def test_auto_threshold_and_no_compiles_while_serving(weights, waves, single_device_outputs):
    counter = CompileCounter()
    # num_pages 89: a cache shape no other test compiles, so warm-up really compiles.
    engine = make_engine(weights, num_pages=89, parallel_mode="shift", sequence_parallel_size=4,
                         tensor_parallel_size=2, shift_parallel_threshold="auto")
    runner = engine.runner
    counter.count = 0
    runner.warmup(progress=False)
    assert counter.count >= 2 * len(TOKEN_BUCKETS)  # both variants, every token bucket

    # Calibration ran during warm-up: one row per token bucket, threshold at the crossover.
    assert [row[0] for row in runner.calibration] == list(runner.buckets.tokens)
    assert all(tp > 0 and sp > 0 for _, tp, sp in runner.calibration)
    assert runner.shift_threshold in (0,) + tuple(runner.buckets.tokens)
    first_sp_win = next((T for T, tp, sp in runner.calibration if sp < tp), None)
    if first_sp_win is None:
        assert runner.shift_threshold == runner.buckets.tokens[-1]
    else:
        assert runner.shift_threshold == max([0] + [T for T in runner.buckets.tokens
                                                    if T < first_sp_win])

    # Serve with a threshold that uses both variants: nothing may compile.
    runner.shift_threshold = THRESHOLD
    used = record_variants(engine)
    counter.count = 0
    outputs = serve(engine, waves)
    compiles = counter.count
    counter.active = False
    assert compiles == 0
    assert outputs == single_device_outputs
    assert_shifts(used, THRESHOLD)


def test_kv_cache_sizing_per_device(monkeypatch):
    """Pages come from the least free device memory, after the weight copies, with each page
    split over the devices (placed KV heads / P)."""
    import jax.numpy as jnp

    from arctic_jax.engine import config as engine_config
    from arctic_jax.kv_cache import bytes_per_page

    monkeypatch.setattr(engine_config, "_device_free_bytes", lambda n=1: 64 << 20)
    cfg = CFG
    ec1 = EngineConfig(page_size=4, max_model_len=64, kv_cache_memory_fraction=0.5)
    one = engine_config.resolve_scheduler_config(cfg, ec1, jnp.float32, weight_bytes=8 << 20)
    assert one.num_pages == (32 << 20) // bytes_per_page(cfg, 4, jnp.float32)
    ec8 = EngineConfig.from_flags(page_size=4, max_model_len=64, kv_cache_memory_fraction=0.5,
                                  parallel_mode="shift", sequence_parallel_size=4,
                                  tensor_parallel_size=2)
    eight = engine_config.resolve_scheduler_config(cfg, ec8, jnp.float32, weight_bytes=8 << 20)
    copies = (8 << 20) // 8 + (8 << 20) // 2        # the TP copy (1/8) and the SP copy (1/2)
    page_per_device = bytes_per_page(cfg, 4, jnp.float32) * 4 // 8  # 2 kv heads placed as 8
    assert eight.num_pages == ((64 << 20) - copies) // 2 // page_per_device


def test_calibration_puts_the_threshold_at_the_crossover(weights, monkeypatch):
    """With a fake clock where TP costs T and SP costs T/2 + 6, SP first wins at T > 12."""
    from arctic_jax.engine import model_runner as mr

    engine = make_engine(weights, parallel_mode="shift", sequence_parallel_size=4,
                         tensor_parallel_size=2, shift_parallel_threshold="auto")
    runner = engine.runner
    clock = {"t": 0.0}

    class Done:
        def block_until_ready(self):
            return self

    def fake_run(variant, inputs):
        T = inputs.model.batch.tokens.shape[0]
        clock["t"] += T if variant == "tp" else T / 2 + 6
        return Done()

    monkeypatch.setattr(runner, "_run", fake_run)
    monkeypatch.setattr(mr.time, "perf_counter", lambda: clock["t"])
    threshold = runner.calibrate(repeats=3)
    buckets = runner.buckets.tokens
    expected = max([0] + [T for T in buckets if T <= 12])
    assert 0 < expected < buckets[-1]  # the crossover lies inside the bucket range
    assert threshold == expected == runner.shift_threshold
    assert [row[0] for row in runner.calibration] == list(buckets)
    assert runner.variant_for(expected) == "tp" and runner.variant_for(expected + 1) == "sp"


@pytest.mark.parametrize("parallel", [
    {},
    dict(parallel_mode="shift", sequence_parallel_size=4, tensor_parallel_size=2,
         shift_parallel_threshold=THRESHOLD),     # first chunks run on the SP variant
    dict(parallel_mode="shift", sequence_parallel_size=4, tensor_parallel_size=2,
         shift_parallel_threshold=32)],           # every step runs on the TP variant
    ids=["one-device", "shift-sp-variant", "shift-tp-variant"])
def test_contiguous_prefill_gives_the_same_tokens(weights, parallel):
    """Prompts whose first chunk runs alone take the contiguous-attention program (on the
    SP variant under shift); greedy tokens equal the paged path's."""
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, 3, 17, 33)   # first chunks fill the 32-token bucket
    params = SamplingParams(max_tokens=6, temperature=0)

    def run(**kw):
        engine = make_engine(weights, **parallel, **kw)
        return [run_all(engine, [p], [params])[0][0] for p in prompts], engine.runner

    paged, _ = run(contiguous_prefill_min_tokens=0)
    contiguous, runner = run(contiguous_prefill_min_tokens=16)
    assert contiguous == paged
    assert runner.num_contiguous_steps == len(prompts)
