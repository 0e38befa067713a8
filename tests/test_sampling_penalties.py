"""Presence, frequency and repetition penalties, logit bias and n copies: the device math against
a numpy reference of each definition, the per-slot state (fills, recording), the sampler program
with mixed rows, and the engine end to end (greedy trajectories checked by teacher forcing,
seeded reproducibility, batch independence, preemption, prefix caching, n copies sharing the
prompt's KV pages)."""
from __future__ import annotations

import asyncio
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.engine.packing import pack
from arctic_jax.engine.programs import jit_sampler_step
from arctic_jax.engine.step_inputs import SamplerInputs
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.sampling import MAX_SEED, SamplingMode, SamplingParams, SamplingTensors, sample
from arctic_jax.sampling_penalties import (
    PenaltyRows,
    PenaltyState,
    apply_fill,
    apply_penalties,
    build_fills,
    record_tokens,
)
from helpers import prefill_logits
from test_engine import CFG, CharTokenizer, make_engine, preemptions, random_prompts, run_all  # noqa: F401


def np_adjusted(logits, prompt, output, presence=0.0, frequency=0.0, repetition=1.0, bias=()):
    """The definition: logit bias, then repetition over prompt and output tokens (positive logits
    divided, others multiplied), then frequency (times generated) and presence (generated at
    all). float64."""
    x = np.asarray(logits, np.float64).copy()
    for t, b in dict(bias).items():
        x[t] += b
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(x))
    seen = counts > 0
    seen[np.asarray(prompt, np.int64)] = True
    x = np.where(seen, np.where(x > 0, x / repetition, x * repetition), x)
    return x - frequency * counts - presence * (counts > 0)


def random_history(rng, v, max_len=30):
    prompt = rng.integers(0, v, size=int(rng.integers(1, max_len)))
    output = rng.integers(0, v, size=int(rng.integers(0, max_len)))
    return [int(t) for t in prompt], [int(t) for t in output]


def random_penalties(rng, v):
    bias = {int(t): float(rng.uniform(-100, 100)) for t in rng.choice(v, size=int(rng.integers(0, 4)),
                                                                      replace=False)}
    return SamplingParams(presence_penalty=float(rng.uniform(-2, 2)),
                          frequency_penalty=float(rng.uniform(-2, 2)),
                          repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2.0)])),
                          logit_bias=bias, temperature=float(rng.choice([0.0, rng.uniform(0.5, 1.5)])),
                          seed=int(rng.integers(0, MAX_SEED)))


def filled_state(num_slots, v, histories, size=16, rng=None):
    """A state whose rows hold ``histories`` (slot, prompt, output, bias pairs), loaded through
    several small fills over rows that held other data before."""
    rng = rng or np.random.default_rng(0)
    state = PenaltyState(output_counts=jnp.asarray(rng.integers(0, 5, (num_slots, v)), jnp.int32),
                         prompt_mask=jnp.asarray(rng.random((num_slots, v)) < 0.5),
                         logit_bias=jnp.asarray(rng.normal(size=(num_slots, v)), jnp.float32))
    fills = build_fills(histories, num_slots, size=size)
    fill = jax.jit(apply_fill)
    for f in fills:
        state = fill(state, f)
    return state, len(fills)


# ------------------------------------------------------------------ parameters

@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 2.5), ("presence_penalty", float("nan")), ("frequency_penalty", -2.01),
    ("frequency_penalty", "1"), ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")),
    ("logit_bias", {3: 100.5}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"3": 1.0}),
    ("logit_bias", {True: 1.0}), ("logit_bias", [(3, 1.0), (3, 2.0)]), ("logit_bias", 5),
    ("n", 0), ("n", 17), ("n", 2.0)])
def test_bad_values_name_the_parameter(field, value):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_parameters_normalised_and_vocab_checked():
    p = SamplingParams(logit_bias={7: 1, 2: -100.0}, presence_penalty=1, n=3, seed=MAX_SEED - 1)
    assert p.logit_bias == ((2, -100.0), (7, 1.0)) and p.presence_penalty == 1.0
    assert p.adjusts_logits() and not SamplingParams().adjusts_logits()
    assert SamplingParams(logit_bias=None).logit_bias == ()
    assert SamplingParams(repetition_penalty=1.2).adjusts_logits()
    p.check_vocab(8)
    with pytest.raises(ValueError, match=r"^SamplingParams\.logit_bias=.*\[7\].*\[0, 7\)"):
        p.check_vocab(7)
    copies = p.copies()
    assert [c.seed for c in copies] == [MAX_SEED - 1, MAX_SEED, 0] and {c.n for c in copies} == {1}
    assert [c.seed for c in SamplingParams(n=2).copies()] == [None, None]
    hash(p)   # still a hashable frozen value


# ------------------------------------------------------------------ device math

def test_fills_load_histories_over_stale_rows_and_recording_counts_tokens():
    rng = np.random.default_rng(1)
    num_slots, v = 6, 40
    histories = []
    for slot in (4, 1, 3):
        prompt, output = random_history(rng, v)
        bias = tuple(sorted({int(t): float(rng.uniform(-9, 9)) for t in rng.choice(v, 3)}.items()))
        histories.append((slot, prompt, output, bias))
    before, _ = filled_state(num_slots, v, [], rng=np.random.default_rng(9))
    state, num_fills = filled_state(num_slots, v, histories, size=16, rng=np.random.default_rng(9))
    assert num_fills >= 3   # the entries span several fills
    for slot, prompt, output, bias in histories:
        np.testing.assert_array_equal(state.output_counts[slot], np.bincount(output, minlength=v))
        np.testing.assert_array_equal(state.prompt_mask[slot], np.isin(np.arange(v), prompt))
        want = np.zeros(v, np.float32)
        want[[t for t, _ in bias]] = [b for _, b in bias]
        np.testing.assert_array_equal(state.logit_bias[slot], want)
    for slot in (0, 2, 5):   # rows no history names are left alone
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(before), strict=True):
            np.testing.assert_array_equal(a[slot], b[slot])
    slots, tokens = jnp.asarray([4, -1, 4, 1]), jnp.asarray([7, 8, 7, 0])
    after = jax.jit(record_tokens)(state, slots, tokens)
    delta = np.asarray(after.output_counts) - np.asarray(state.output_counts)
    expected = np.zeros_like(delta)
    expected[4, 7], expected[1, 0] = 2, 1
    np.testing.assert_array_equal(delta, expected)


def test_adjusted_logits_and_probabilities_equal_the_numpy_reference():
    """Mixed rows in one batch: some with penalties (different values, some sharing a slot's
    history), some without (slot -1, unchanged)."""
    rng = np.random.default_rng(2)
    num_slots, v, r = 5, 64, 10
    histories = [(s, *random_history(rng, v), ()) for s in range(num_slots)]
    params = [random_penalties(rng, v) for _ in range(r)]
    slots = [int(rng.integers(-1, num_slots)) for _ in range(r)]
    slots[0], slots[1] = -1, 2
    histories = [(s, p, o, params[slots.index(s)].logit_bias if s in slots else ())
                 for s, p, o, _ in histories]
    state, _ = filled_state(num_slots, v, histories, rng=rng)
    logits = (rng.normal(size=(r, v)) * 4).astype(np.float32)
    rows = PenaltyRows.from_values(slots, [p.presence_penalty for p in params],
                                   [p.frequency_penalty for p in params],
                                   [p.repetition_penalty for p in params], num_rows=r)
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), state, rows))
    for i in range(r):
        if slots[i] < 0:
            np.testing.assert_array_equal(got[i], logits[i])
            continue
        _, prompt, output, bias = histories[slots[i]]
        p = params[i]
        want = np_adjusted(logits[i], prompt, output, p.presence_penalty, p.frequency_penalty,
                           p.repetition_penalty, bias)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-4)
        t = max(p.temperature, 0.7)
        probs = np.asarray(jax.nn.softmax(jnp.asarray(got[i]) / t))
        ref = np.exp(want / t - (want / t).max())
        np.testing.assert_allclose(probs, ref / ref.sum(), rtol=1e-4, atol=1e-7)
    assert sum(s >= 0 for s in slots) >= 6


@pytest.mark.parametrize("mode", list(SamplingMode))
def test_sampler_program_draws_from_the_adjusted_logits(mode):
    """The jitted penalty sampler: each row's token is the one the plain sampler draws from the
    numpy-adjusted logits (same seed and step), logprobs describe the raw logits, and the
    penalty rows' tokens are counted in their slots."""
    rng = np.random.default_rng({"greedy": 3, "random": 4, "filtered": 5}[mode.value])
    num_slots, v, r = 8, 50, 8
    params = [random_penalties(rng, v) if i % 3 else SamplingParams(seed=i) for i in range(r)]
    if mode is SamplingMode.GREEDY:
        params = [dataclasses.replace(p, temperature=0.0) for p in params]
    elif mode is SamplingMode.FILTERED:
        params = [dataclasses.replace(p, top_k=20, top_p=0.9) for p in params]
    assert SamplingMode.for_params(params) in (mode, SamplingMode.GREEDY)
    slot_of = list(rng.permutation(num_slots))
    histories = [(int(slot_of[i]), *random_history(rng, v), p.logit_bias)
                 for i, p in enumerate(params) if p.adjusts_logits()]
    state, _ = filled_state(num_slots, v, histories, rng=rng)
    slots = [int(slot_of[i]) if p.adjusts_logits() else -1 for i, p in enumerate(params)]
    steps = [int(s) for s in rng.integers(0, 50, r)]
    sampling = SamplingTensors.from_params(params, steps, [p.seed for p in params], r)
    rows = PenaltyRows.from_values(slots, [p.presence_penalty for p in params],
                                   [p.frequency_penalty for p in params],
                                   [p.repetition_penalty for p in params], num_rows=r)
    none = np.full(r, -1, np.int32)
    flat, layout = pack(SamplerInputs(sample_slot=none, sampling=sampling, draft=none, q_row=none,
                                      penalties=rows))
    logits = (rng.normal(size=(r, v)) * 3).astype(np.float32)
    counts_before = np.asarray(state.output_counts)
    program = jit_sampler_step(mode, 2, False, True)
    _, result, state = program(jnp.asarray(logits), jnp.zeros(num_slots, jnp.int32), None, flat,
                               layout, state)
    result = np.asarray(result)
    tokens = result[:, 0]
    reference = logits.copy()
    history = {h[0]: h for h in histories}
    for i, p in enumerate(params):
        if slots[i] >= 0:
            _, prompt, output, bias = history[slots[i]]
            reference[i] = np_adjusted(logits[i], prompt, output, p.presence_penalty,
                                       p.frequency_penalty, p.repetition_penalty, bias)
    want = sample(jnp.asarray(reference), sampling, 2, mode)
    np.testing.assert_array_equal(tokens, np.asarray(want.tokens))
    raw_logprob = logits[np.arange(r), tokens] - np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(result[:, 1].view(np.float32), raw_logprob, rtol=1e-5, atol=1e-5)
    expected = counts_before.copy()
    for i in range(r):
        if slots[i] >= 0:
            expected[slots[i], tokens[i]] += 1
    np.testing.assert_array_equal(np.asarray(state.output_counts), expected)
    if mode is not SamplingMode.GREEDY:   # the adjustments changed some draws (the test has teeth)
        plain = sample(jnp.asarray(logits), sampling, 2, mode)
        assert (np.asarray(plain.tokens) != tokens).any()


# ------------------------------------------------------------------ the engine

@pytest.fixture(scope="module")
def weights():
    return random_weights(CFG, jax.random.PRNGKey(7), scale=0.3)


def check_greedy_trajectory(weights, prompt, output, p):
    """Teacher forcing: every generated token is the argmax of the reference-adjusted logits of
    the model given the prompt and the tokens before it (positions with a near-tie skipped)."""
    logits = prefill_logits(CFG, weights, np.asarray(prompt + output[:-1]), page_size=4)
    checked = 0
    for i, token in enumerate(output):
        x = np_adjusted(logits[len(prompt) - 1 + i], prompt, output[:i], p.presence_penalty,
                        p.frequency_penalty, p.repetition_penalty, p.logit_bias)
        top2 = np.sort(x)[-2:]
        if top2[1] - top2[0] > 1e-3:
            assert token == int(np.argmax(x)), f"token {i}"
            checked += 1
    assert checked >= len(output) - 1


def test_greedy_penalties_follow_the_reference_and_stop_repeats(weights):
    rng = np.random.default_rng(20)
    prompts = random_prompts(rng, 4, 5, 12)
    n = 40
    plain, _ = run_all(make_engine(weights), prompts, [SamplingParams(max_tokens=n, temperature=0)] * 4)
    assert all(len(set(t)) < n for t in plain)   # the unpenalised runs repeat tokens
    params = [SamplingParams(max_tokens=n, temperature=0, frequency_penalty=2.0, presence_penalty=2.0),
              SamplingParams(max_tokens=n, temperature=0, repetition_penalty=1.8),
              SamplingParams(max_tokens=n, temperature=0, presence_penalty=-0.5, frequency_penalty=0.7,
                             logit_bias={3: 2.5, 50: -4.0}),
              SamplingParams(max_tokens=n, temperature=0)]
    got, _ = run_all(make_engine(weights), prompts, params)
    assert len(set(got[0])) == n   # never repeats
    assert got[3] == plain[3]      # a row without penalties is untouched by its neighbours
    for prompt, out, p in zip(prompts, got, params, strict=True):
        check_greedy_trajectory(weights, prompt, out, p)


def test_logit_bias_forces_a_token_and_bad_ids_are_refused(weights):
    engine = make_engine(weights)
    (forced,), _ = run_all(engine, [[1, 2, 3]], [SamplingParams(max_tokens=8, seed=1,
                                                                logit_bias={42: 100.0})])
    assert forced == [42] * 8
    with pytest.raises(ValueError, match=r"^SamplingParams\.logit_bias=.*outside the vocabulary"):
        engine.add_request([1, 2], SamplingParams(logit_bias={CFG.vocab_size: 1.0}))
    with pytest.raises(ValueError, match=r"^SamplingParams\.n=2"):
        engine.add_request([1, 2], SamplingParams(n=2))


def test_seeded_penalties_reproducible_and_independent_of_the_batch(weights):
    rng = np.random.default_rng(21)
    prompts = random_prompts(rng, 5)
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=70 + i, frequency_penalty=0.8,
                             presence_penalty=0.3 * i, repetition_penalty=1.0 + 0.2 * i,
                             logit_bias={i: 3.0}) for i in range(4)] + [
        SamplingParams(max_tokens=12, temperature=1.0, seed=3)]
    together, _ = run_all(make_engine(weights), prompts, params)
    again, _ = run_all(make_engine(weights), prompts, params)
    assert again == together
    for i in (1, 4):
        assert run_all(make_engine(weights), [prompts[i]], [params[i]])[0][0] == together[i]
    unpenalised = SamplingParams(max_tokens=12, temperature=1.0, seed=71)
    assert run_all(make_engine(weights), [prompts[1]], [unpenalised])[0][0] != together[1]


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_and_prefix_caching_keep_penalty_outputs(weights, preemptions,  # noqa: F811
                                                            prefix_caching):
    """A tiny page pool preempts requests; their rows are reloaded from the prompt and every
    token generated so far. With prefix caching the cached prompt tokens still count."""
    rng = np.random.default_rng(22)
    system = list(rng.integers(0, CFG.vocab_size, size=9))
    prompts = [system + list(rng.integers(0, CFG.vocab_size, size=int(k)))
               for k in rng.integers(2, 10, size=6)]
    params = [SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.5),
              SamplingParams(max_tokens=20, temperature=0.9, seed=5, frequency_penalty=1.0),
              SamplingParams(max_tokens=20, temperature=0.0),
              SamplingParams(max_tokens=20, temperature=0.0, presence_penalty=1.5, logit_bias={9: 2.0}),
              SamplingParams(max_tokens=20, temperature=0.8, seed=8, repetition_penalty=0.7),
              SamplingParams(max_tokens=20, temperature=0.0, frequency_penalty=-1.0)]
    expected, _ = run_all(make_engine(weights, enable_prefix_caching=False), prompts, params)
    preemptions["n"] = 0
    engine = make_engine(weights, num_pages=14, max_model_len=48, enable_prefix_caching=prefix_caching)
    got, _ = run_all(engine, prompts, params)
    assert preemptions["n"] > 0
    assert got == expected
    assert engine.scheduler.allocator.usage() == 0.0


def test_penalties_refused_with_speculative_decoding(weights):
    from arctic_jax.speculative.config import SpeculativeConfig

    engine = make_engine(weights, speculative_config=SpeculativeConfig("ngram", 3))
    with pytest.raises(ValueError, match=r"^SamplingParams\.presence_penalty=.*speculative"):
        engine.add_request([1, 2, 3], SamplingParams(presence_penalty=0.5))
    engine.add_request([1, 2, 3], SamplingParams())   # plain requests still run


# ------------------------------------------------------------------ n copies

def _llm(engine):
    from arctic_jax.llm import LLM

    llm = LLM.__new__(LLM)
    llm.engine, llm.tokenizer = engine, CharTokenizer()
    return llm


def test_llm_generate_n_copies_share_the_prompt_pages(weights):
    rng = np.random.default_rng(23)
    prompt = [int(t) for t in rng.integers(0, CFG.vocab_size, size=22)]   # 5 full pages of 4
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=40, frequency_penalty=0.5)
    engine = make_engine(weights)
    outs = _llm(engine).generate([prompt, prompt[:5]], [params, SamplingParams(max_tokens=4)])
    assert [(o.index, o.prompt_token_ids == prompt) for o in outs] == [
        (0, True), (1, True), (2, True), (0, False)]
    # copies 1 and 2 found copy 0's five full prompt pages in the prefix cache
    assert engine.scheduler.allocator.stats()["hit_tokens"] == 2 * 20
    for i, out in enumerate(outs[:3]):   # copy i is the request seeded 40 + i
        alone = _llm(make_engine(weights)).generate([prompt], SamplingParams(
            max_tokens=10, temperature=1.0, seed=40 + i, frequency_penalty=0.5))
        assert out.token_ids == alone[0].token_ids
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3


def test_copies_of_one_prompt_share_its_pages_on_the_async_front(weights):
    """The server's n choices: copy i is the request seeded seed + i; copies 1.. start after
    copy 0's first output and find its full prompt pages in the prefix cache."""
    from arctic_jax.engine.async_engine import AsyncEngine
    from arctic_jax.engine.choice_jobs import copy_jobs
    from arctic_jax.serving.generations import Generations

    rng = np.random.default_rng(24)
    prompt = [int(t) for t in rng.integers(0, CFG.vocab_size, size=22)]
    params = SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=9, presence_penalty=1.0)
    front = AsyncEngine(make_engine(weights))
    front.start()

    async def collect(p, rid):
        jobs = copy_jobs(0, rid, prompt, p)
        gens = Generations(front, jobs)
        tokens, last = {}, {}
        try:
            await gens.start()
            async for i, out in gens.outputs():
                tokens.setdefault(i, []).extend(out.new_token_ids)
                last[i] = out
        finally:
            gens.close()
        return jobs, tokens, last

    try:
        jobs, tokens, last = asyncio.run(collect(params, "r"))
        assert [j.request_id for j in jobs] == ["r-0", "r-1", "r-2", "r-3"]
        assert sorted(tokens) == [0, 1, 2, 3] and all(o.finished for o in last.values())
        assert [last[i].num_cached_tokens for i in range(4)] == [0, 20, 20, 20]
        assert {last[i].num_prompt_tokens for i in range(4)} == {22}
        one, single, _ = asyncio.run(collect(SamplingParams(
            max_tokens=6, temperature=1.0, seed=11, presence_penalty=1.0), "s"))
        assert [j.request_id for j in one] == ["s"]
        assert single[0] == tokens[2]   # copy 2 is the request seeded 9 + 2
    finally:
        front.shutdown()


@pytest.mark.parametrize("mode", list(SamplingMode))
def test_penalty_programs_have_no_control_flow_on_cuda(mode):
    """Like tests/test_engine_programs.py: a device-side branch would make the launching thread
    wait for the GPU, undoing the engine's overlap of steps."""
    from arctic_jax.engine.programs import jit_penalty_fill

    r, num_slots, v = 8, 8, 64
    state = PenaltyState.zeros(num_slots, v)
    none = np.full(r, -1, np.int32)
    inputs = SamplerInputs(sample_slot=none, sampling=SamplingTensors.from_params([], [], [], r),
                           draft=none, q_row=none,
                           penalties=PenaltyRows.from_values([], [], [], [], num_rows=r))
    flat, layout = pack(inputs)
    texts = [jit_sampler_step(mode, 2, False, True).trace(
        jnp.zeros((r, v)), jnp.zeros(num_slots, jnp.int32), None, flat, layout, state)]
    flat, layout = pack(build_fills([], num_slots)[0])
    texts.append(jit_penalty_fill().trace(state, flat, layout))
    for traced in texts:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert not [op for op in ("stablehlo.while", "stablehlo.case", "stablehlo.if") if op in text]
