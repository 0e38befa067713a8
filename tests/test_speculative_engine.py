"""Speculative decoding through the engine: greedy output with n-gram drafts is token-for-token
the output without them (SmolLM2, one device and shift SP2xTP2, prefix caching, preemption, stop
strings and max_tokens inside an accepted run), acceptance counts on a scripted proposer, the
metrics, and no compilation while serving with speculation on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.config import ModelConfig
from arctic_jax.engine.compile_counter import CompileCounter
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingParams
from arctic_jax.speculative.config import SpeculativeConfig
from helpers import CharTokenizer
from oracles import chi2_pvalue

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 1}
CODE = ("def add(a, b):\n    return a + b\n\n\ndef scale(values, factor):\n"
        "    return [v * factor for v in values]\n")
REPEATING = [f"Rewrite this code with type hints:\n{CODE}",
             "Repeat this list exactly, twice: apple, pear, plum, cherry, melon, grape."]
OTHER = ["What is the capital of France?", "Write a haiku about the sea."]


def run(engine, prompts, params):
    """Drive the engine to completion: (token ids, text, finish reason, token-count of each
    streamed update) per request."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    out = {i: ([], [], None, []) for i in ids}
    for _ in range(20_000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            tokens, text, _, runs = out[o.request_id]
            tokens.extend(o.new_token_ids)
            text.append(o.new_text)
            runs.append(len(o.new_token_ids))
            if o.finished:
                out[o.request_id] = (tokens, text, o.finish_reason.value, runs)
    assert not engine.has_unfinished()
    return [(t, "".join(x), r, runs) for t, x, r, runs in (out[i] for i in ids)]


# ------------------------------------------------------------------ SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    from arctic_jax.tokenizer import encode_chat
    from checkpoints import load_model
    from checkpoints.loader import load_tokenizer

    model = load_model("default", dtype=jnp.float32, progress=False)
    tok = load_tokenizer(model.tokenizer_source.path, model.tokenizer_source.gguf_file)
    prompts = [encode_chat(tok, [{"role": "user", "content": p}]) for p in REPEATING + OTHER]
    return model, tok, prompts


def smol_engine(smollm2, speculative=None, **kw):
    model, tok, _ = smollm2
    base = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256, page_size=16,
                token_buckets=(8, 16, 32, 64), page_buckets=(16,), attention_impl="reference",
                speculative_config=speculative)
    base.update(kw)
    return LLMEngine(model.spec, model.config, model.weights, tok, EngineConfig.from_flags(**base))


@pytest.fixture(scope="module")
def smol_reference(smollm2):
    """Greedy outputs without speculation (one device)."""
    params = [SamplingParams(max_tokens=48, temperature=0)] * len(smollm2[2])
    return run(smol_engine(smollm2), smollm2[2], params)


@pytest.fixture(scope="module")
def smol_speculative(smollm2):
    engine = smol_engine(smollm2, NGRAM)
    params = [SamplingParams(max_tokens=48, temperature=0)] * len(smollm2[2])
    return engine, run(engine, smollm2[2], params)


def test_ngram_greedy_equals_plain_greedy_on_smollm2(smol_reference, smol_speculative):
    engine, outs = smol_speculative
    for (want, want_text, want_reason, _), (got, text, reason, _) in zip(smol_reference, outs, strict=True):
        assert got == want and text == want_text and reason == want_reason
    stats = engine.spec_stats
    # The prompts that repeat their input do speculate, and drafts are accepted.
    assert stats.num_draft_steps > 0 and stats.acceptance_rate > 0.3
    assert stats.mean_tokens_per_step > 1.3
    n = sum(len(o[0]) for o in outs)   # all but each request's first token come from decodes
    assert stats.num_emitted == n - len(outs)
    # the chat template's system prompt is shared: later requests hit the prefix cache
    assert engine.scheduler.allocator.stats()["hit_rate"] > 0


def test_ngram_on_shift_sp2_tp2_equals_one_device(smollm2, smol_reference):
    engine = smol_engine(smollm2, NGRAM, parallel_mode="shift", sequence_parallel_size=2,
                         tensor_parallel_size=2, shift_parallel_threshold=16)
    params = [SamplingParams(max_tokens=48, temperature=0)] * len(smollm2[2])
    outs = run(engine, smollm2[2], params)
    used = {v for v in ("tp", "sp")
            if engine.metrics.steps.labels(v)._value.get() > 0}
    assert used == {"tp", "sp"}
    assert engine.spec_stats.num_draft_steps > 0
    for (want, *_), (got, *_) in zip(smol_reference, outs, strict=True):
        assert got == want


def test_ngram_with_preemption_and_prefix_cache(smollm2):
    """A pool too small for all five requests at full length (ignore_eos): preemption and
    recompute (the prefix cache serves pages of verified tokens only), and the same tokens."""
    prompts = smollm2[2] + smollm2[2][:1]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * len(prompts)
    want = run(smol_engine(smollm2), prompts, params)
    engine = smol_engine(smollm2, NGRAM, num_pages=17)   # one 256-token sequence fits
    preempted = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda r: (preempted.append(r.request_id), original(r))[1]
    outs = run(engine, prompts, params)
    assert preempted, "the pool was meant to force preemption"
    assert engine.spec_stats.num_draft_steps > 0
    for (w, *_), (got, *_) in zip(want, outs, strict=True):
        assert got == w
    allocator = engine.scheduler.allocator
    allocator.check_invariants()
    assert allocator.num_free() == allocator.num_allocatable   # no page leaked


def _inside_a_run(runs: list[int]) -> int:
    """Index of a token that is neither first nor last of a multi-token streamed update."""
    start = 0
    for n in runs:
        if n >= 3:
            return start + 1
        start += n
    raise AssertionError(f"no run of 3+ tokens in {runs}")


def test_stop_string_and_max_tokens_inside_an_accepted_run(smollm2, smol_speculative):
    """The request stops mid-run: later tokens are dropped, usage counts the tokens returned, and
    output, text and finish reason equal those without speculation."""
    model, tok, prompts = smollm2
    _, outs = smol_speculative
    tokens, _, _, runs = outs[0]
    j = _inside_a_run(runs)
    text_upto = tok.decode(tokens[:j + 1], skip_special_tokens=True)
    before = tok.decode(tokens[:j], skip_special_tokens=True)
    stop = text_upto[len(before) - 2:] if len(before) >= 2 else text_upto
    assert stop and stop not in before
    for params in (SamplingParams(max_tokens=48, temperature=0, stop=[stop]),
                   SamplingParams(max_tokens=j + 1, temperature=0)):
        want = run(smol_engine(smollm2), prompts[:1], [params])[0]
        spec_engine = smol_engine(smollm2, NGRAM)
        got = run(spec_engine, prompts[:1], [params])[0]
        assert got[:3] == want[:3]
        assert len(got[0]) <= j + 1
        # the step that ended the request had been a run of 3+ tokens without the stop
        assert sum(got[3][:-1]) < j + 1 <= sum(got[3][:-1]) + runs[len(got[3]) - 1]


# ------------------------------------------------------------- scripted drafts
CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=512)


class StatelessProposer:
    """A test proposer that keeps no per-request state."""

    def on_tokens(self, request, new_tokens):
        pass

    def on_finish(self, request):
        pass


class ScriptedProposer(StatelessProposer):
    """Proposes, per call, ``good`` true next tokens then ``bad`` wrong ones (from a script)."""

    def __init__(self, truth: dict[str, list[int]], script: list[tuple[int, int]]):
        self.truth, self.script, self.calls = truth, list(script), 0

    def propose(self, requests, k):
        drafts = []
        for r in requests:
            good, bad = self.script[self.calls] if self.calls < len(self.script) else (0, 0)
            self.calls += 1
            rest = self.truth[r.request_id][len(r.output_ids):]
            draft = rest[:good] + [(t + 1) % CFG.vocab_size for t in rest[good:good + bad]]
            drafts.append(draft[:k])
        return drafts


@pytest.fixture(scope="module")
def tiny_weights():
    return LLAMA.random_weights(CFG, jax.random.PRNGKey(11), scale=0.3)


def tiny_engine(weights, speculative=None, **kw):
    base = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, page_size=4,
                num_pages=64, token_buckets=(8, 16, 32), page_buckets=(32,),
                attention_impl="reference", speculative_config=speculative)
    base.update(kw)
    return LLMEngine(LLAMA, CFG, weights, CharTokenizer(), EngineConfig.from_flags(**base))


def test_acceptance_counts_by_hand(tiny_weights):
    """One request, 20 tokens, k = 4. Script (good, bad) per proposal:
    (2, 1): accept 2, emit 3 | (0, 3): accept 0, emit 1 | (4, 0): accept 4, emit 5 |
    (1, 3): accept 1, emit 2 | (3, 1): accept 3, emit 4 -> 15 tokens after the first;
    the first token comes from the prefill step, the last 4 from proposals past the script
    (no draft): 1 + 15 + 4 = 20.
    """
    rng = np.random.default_rng(3)
    prompt = [int(t) for t in rng.integers(0, CFG.vocab_size, 9)]
    params = SamplingParams(max_tokens=20, temperature=0)
    (truth, *_), = run(tiny_engine(tiny_weights), [prompt], [params])
    engine = tiny_engine(tiny_weights, SpeculativeConfig("ngram", 4))
    engine.proposer = ScriptedProposer({"req-1": truth},
                                       [(2, 1), (0, 3), (4, 0), (1, 3), (3, 1)])
    (got, _, reason, runs), = run(engine, [prompt], [params])
    assert got == truth and reason == "length"
    assert runs == [1, 3, 1, 5, 2, 4, 1, 1, 1, 1]
    s = engine.spec_stats
    assert (s.num_draft_steps, s.num_drafted, s.num_accepted) == (5, 18, 10)
    assert s.drafted_by_position == [5, 5, 5, 3]
    assert s.accepted_by_position == [4, 3, 2, 1]
    assert s.num_steps == 9 and s.num_emitted == 19       # 5 verified + 4 plain decodes
    assert s.mean_tokens_per_step == pytest.approx(19 / 9)
    text = engine.metrics.render().decode()
    assert "arctic_spec_decode_num_draft_tokens_total 18.0" in text
    assert "arctic_spec_decode_num_accepted_tokens_total 10.0" in text
    assert 'arctic_spec_decode_num_accepted_tokens_per_pos_total{position="3"} 1.0' in text


@pytest.mark.parametrize("method", ["ngram", "suffix_tree"])
def test_no_compilation_while_serving_with_speculation(tiny_weights, method):
    """Warm-up compiles the verify shapes too (R = S x (1 + k) rows; tree-attention batches),
    then serving with n-gram drafts or suffix draft trees, several requests verifying at once,
    compiles nothing."""
    speculative = NGRAM if method == "ngram" else dict(SUFFIX_TREE, num_speculative_tokens=4)
    engine = tiny_engine(tiny_weights, speculative, num_pages=71)   # a cache shape of its own
    rng = np.random.default_rng(8)
    motif = [int(t) for t in rng.integers(0, CFG.vocab_size, 5)]
    prompts = [motif * 4 + [int(t) for t in rng.integers(0, CFG.vocab_size, 3)] for _ in range(6)]
    kinds = [dict(temperature=0.0), dict(temperature=0.0), dict(temperature=0.8, seed=2)]
    serve_warmed_without_compiling(engine, prompts, [SamplingParams(max_tokens=24, **kinds[i % 3])
                                                     for i in range(6)])


def serve_warmed_without_compiling(engine, prompts, params):
    """Warm the engine up (which must compile), then serve ``prompts``: drafts are verified and
    nothing compiles."""
    counter = CompileCounter()
    try:
        engine.runner.warmup(progress=False)
        assert counter.count > 0
        counter.count = 0
        run(engine, prompts, params)
        assert engine.spec_stats.num_draft_steps > 0
        assert counter.count == 0
    finally:
        counter.close()


class RecordingProposer(StatelessProposer):
    """Records how many requests each ``propose`` call got (with how many running), drafts nothing."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def propose(self, requests, k):
        self.calls.append((len(requests), len(self.engine.scheduler.running)))
        return [[] for _ in requests]


@pytest.mark.parametrize("limits, check", [
    ({"disable_by_batch_size": 2}, lambda asked, running: asked <= 2 if running > 2 else True),
    ({"hard_disable_by_batch_size": 2}, lambda asked, running: running <= 2),
])
def test_drafting_disabled_by_batch_size(tiny_weights, limits, check):
    """Soft cap: above N running requests only N are asked for drafts; hard cap: none is."""
    engine = tiny_engine(tiny_weights, {"method": "ngram", "num_speculative_tokens": 3, **limits})
    engine.proposer = RecordingProposer(engine)
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(0, CFG.vocab_size, 6)] for _ in range(4)]
    lengths = [3, 6, 9, 12]   # requests finish one by one, so the batch shrinks below the caps
    run(engine, prompts, [SamplingParams(max_tokens=n, temperature=0) for n in lengths])
    calls = engine.proposer.calls
    assert any(running > 2 for _, running in calls) or "hard_disable_by_batch_size" in limits
    assert any(running <= 2 for _, running in calls)
    assert all(check(asked, running) for asked, running in calls), calls


class WrongDraftProposer(RecordingProposer):
    """Records the calls like ``RecordingProposer`` and drafts three tokens that are never right."""

    def propose(self, requests, k):
        super().propose(requests, k)
        return [[(r.output_ids[-1] + 1 + i) % CFG.vocab_size for i in range(3)] for r in requests]


@pytest.mark.parametrize("pays", [False, True])
def test_governor_turns_speculation_off_where_it_does_not_pay(tiny_weights, pays):
    """With more running requests than ``adaptive_disable_batch_size``, a speculative step that
    takes 10 (fake) ms against 6 ms for a plain one: all-wrong drafts (1 token per step) lose, and
    drafting stops after the governor's two measuring windows; a speculative step of 3.3 ms (as
    if drafts paid) keeps speculation on. Output equals plain greedy either way."""
    from arctic_jax.speculative.governor import GovernorConfig, SpeculationGovernor

    rng = np.random.default_rng(21)
    prompts = [[int(t) for t in rng.integers(0, CFG.vocab_size, 7)] for _ in range(4)]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * 4
    want = run(tiny_engine(tiny_weights), prompts, params)
    engine = tiny_engine(tiny_weights, {"method": "ngram", "num_speculative_tokens": 3,
                                        "adaptive_disable_batch_size": 2})
    engine.proposer = WrongDraftProposer(engine)
    clock = [0.0]

    def tick():   # each step's duration, by the mode it ran in
        clock[0] += (0.010 / (3 if pays else 1)) if engine.governor.speculating else 0.006
        return clock[0]
    engine.governor = SpeculationGovernor(GovernorConfig(2, window=4, probe_every=64), tick)
    got = run(engine, prompts, params)
    assert [g[0] for g in got] == [w[0] for w in want]
    calls = len(engine.proposer.calls)
    steps_governed = sum(1 for _, running in engine.proposer.calls if running > 2)
    if pays:
        assert engine.governor.rates[True] > engine.governor.rates[False]
        assert steps_governed >= 30
    else:
        assert engine.governor.rates[False] > engine.governor.rates[True]
        assert 5 <= steps_governed <= 12 and calls < 30, engine.proposer.calls


SUFFIX = {"method": "suffix", "num_speculative_tokens": 8, "suffix_cache_max_depth": 24}


def test_suffix_greedy_equals_plain_greedy_on_smollm2(smollm2, smol_reference):
    """Arctic's suffix decoding (path mode, per-request and global trees) through the engine."""
    engine = smol_engine(smollm2, SUFFIX)
    params = [SamplingParams(max_tokens=48, temperature=0)] * len(smollm2[2])
    outs = run(engine, smollm2[2], params)
    for (want, want_text, want_reason, _), (got, text, reason, _) in zip(smol_reference, outs, strict=True):
        assert got == want and text == want_text and reason == want_reason
    assert engine.spec_stats.num_draft_steps > 0 and engine.spec_stats.acceptance_rate > 0.3
    # finished responses stay in the global tree; the per-request trees are gone
    assert engine.proposer.num_cached_responses == len(outs) and engine.proposer.num_tracked == 0


# ------------------------------------------------------- sampled requests speculate too
SMALL = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=64)


_SKEW = np.random.default_rng(0).dirichlet(np.full(16, 0.3))   # drafts favour a few tokens


class RandomDraftProposer(StatelessProposer):
    """k random one-hot drafts (often wrong) from a skewed distribution (uniform drafts would hide
    some wrong verifiers), drawn from the request's seed and length, so a request gets the same
    drafts whatever shares its batch."""

    def propose(self, requests, k):
        return [[int(t) for t in np.random.default_rng((r.seed, len(r.output_ids)))
                 .choice(SMALL.vocab_size, k, p=_SKEW)] for r in requests]


def _exact_distributions(weights, prompt):
    """p(t1), p(t2 | t1) [V, V] and p(t3 | t1, t2) [V, V, V] of the model at temperature 1, from
    plain forward passes (no engine)."""
    from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
    from arctic_jax.kv_cache import KVCache
    from arctic_jax.models.llama import make_step_fn

    V = SMALL.vocab_size
    step = make_step_fn(SMALL)
    n = len(prompt) + 2
    pages_per_seq = -(-n // 4)
    contexts = [prompt] + [prompt + [a] for a in range(V)] + [prompt + [a, b] for a in range(V)
                                                            for b in range(V)]
    buckets = Buckets(tokens=(len(contexts) * n,), seqs=(len(contexts),), pages=(pages_per_seq,))
    chunks = [SequenceChunk(c, 0, list(range(i * pages_per_seq, (i + 1) * pages_per_seq)))
              for i, c in enumerate(contexts)]
    batch, _ = build_step_batch(chunks, 4, buckets)
    cache = KVCache.allocate(SMALL, len(contexts) * pages_per_seq, 4, jnp.float32)
    logits, _ = step(weights, cache, batch)
    logits = np.asarray(logits[:len(contexts)], np.float64)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs[0], probs[1:1 + V], probs[1 + V:].reshape(V, V, V)


@pytest.mark.parametrize("drafts", ["path", "tree"])
def test_sampled_output_with_speculation_is_distribution_exact(drafts):
    """Temperature 1 with random one-hot drafts (mostly wrong; rejection sampling on the device):
    the first three tokens of 6,000 seeded requests follow the model's exact distribution (the
    joint of the first two, and the third given the first two), as without speculation; the
    same test rejects a wrong distribution. Seeded requests repeat exactly in another batch.
    "tree": random draft trees of 3 tokens walked on the host (one row per tree node)."""
    weights = LLAMA.random_weights(SMALL, jax.random.PRNGKey(5), scale=0.25)
    prompt = [3, 7, 1, 12, 5]
    p1, p2, p3 = _exact_distributions(weights, prompt)
    joint12 = p1[:, None] * p2                                                 # [V, V]
    n = 6000
    params = [SamplingParams(max_tokens=3, temperature=1.0, seed=i) for i in range(n)]

    def sampled(speculative, order):
        kw = dict(max_num_seqs=64, max_num_batched_tokens=256, max_model_len=32, page_size=4,
                  num_pages=600, token_buckets=(64, 128, 256), page_buckets=(8,),
                  attention_impl="reference", speculative_config=speculative)
        engine = LLMEngine(LLAMA, SMALL, weights, CharTokenizer(), EngineConfig.from_flags(**kw))
        if speculative:
            engine.proposer = RandomDraftProposer() if drafts == "path" else RandomTreeProposer()
        outs = run(engine, [prompt] * len(order), [params[i] for i in order])
        return np.array([o[0] for o in outs]), engine.spec_stats

    spec_cfg = ({"method": "ngram", "num_speculative_tokens": 2} if drafts == "path" else
                {"method": "suffix", "num_speculative_tokens": 3, "suffix_use_tree_spec": True})
    tokens, stats = sampled(spec_cfg, list(range(n)))
    assert stats.num_draft_steps > 0.9 * n and 0.02 < stats.acceptance_rate < 0.5
    first2 = tokens[:, 0] * SMALL.vocab_size + tokens[:, 1]
    assert chi2_pvalue(first2, joint12) > 1e-4
    third = first2 * SMALL.vocab_size + tokens[:, 2]
    assert chi2_pvalue(third, joint12[:, :, None] * p3) > 1e-4
    # the test has power: a near-miss (the first two tokens' joint with p2 of the wrong context)
    assert chi2_pvalue(first2, p1[:, None] * p2[np.roll(np.arange(SMALL.vocab_size), 1)]) < 1e-4
    if drafts == "path":
        plain, _ = sampled(None, list(range(n)))
        assert chi2_pvalue(plain[:, 0] * SMALL.vocab_size + plain[:, 1], joint12) > 1e-4
    # seeded: the same requests in reverse order, in other batches, repeat token for token
    again, _ = sampled(spec_cfg, list(range(n))[::-1][:256])
    assert (again[::-1] == tokens[n - 256:]).all()


# ------------------------------------------------------------ draft trees (one step each)
SUFFIX_TREE = dict(SUFFIX, suffix_use_tree_spec=True)


def _branching(engine) -> int:
    """Verified tree chunks so far that branched (recorded by a wrapper on the scheduler)."""
    return sum(1 for parents in engine.scheduler.trees_seen if len(set(parents)) < len(parents))


def _record_trees(engine):
    engine.scheduler.trees_seen = []
    original = engine.scheduler._make_chunk

    def make_chunk(request, n, draft=(), parents=None, *args):
        if parents is not None and draft:
            engine.scheduler.trees_seen.append(parents)
        return original(request, n, draft, parents, *args)
    engine.scheduler._make_chunk = make_chunk
    return engine


@pytest.mark.parametrize("layout", ["one_device", "shift_sp2_tp2"])
def test_suffix_tree_greedy_equals_plain_greedy_on_smollm2(smollm2, smol_reference, layout):
    """Suffix decoding's tree mode: whole draft trees verified in one step through the tree
    attention mask give the plain greedy output token for token."""
    kw = {} if layout == "one_device" else dict(
        parallel_mode="shift", sequence_parallel_size=2, tensor_parallel_size=2,
        shift_parallel_threshold=16)
    engine = _record_trees(smol_engine(smollm2, SUFFIX_TREE, **kw))
    params = [SamplingParams(max_tokens=48, temperature=0)] * len(smollm2[2])
    outs = run(engine, smollm2[2], params)
    for (want, want_text, want_reason, _), (got, text, reason, _) in zip(smol_reference, outs, strict=True):
        assert got == want and text == want_text and reason == want_reason
    assert _branching(engine) > 0, "no draft tree branched: the tree path was not exercised"
    assert engine.spec_stats.num_draft_steps > 0 and engine.spec_stats.mean_tokens_per_step > 1.3
    allocator = engine.scheduler.allocator
    assert allocator.num_free() == allocator.num_allocatable


class ScriptedTreeProposer(StatelessProposer):
    """Draft trees (``propose_drafts``) holding the true continuation on a chosen branch: script
    entries are ("chain", n) -- the truth's next n tokens as the first-child chain -- or
    ("branch", n) -- a wrong first child (with a wrong child of its own), then the truth's
    next n tokens hanging off the root as its second child, ending in a wrong leaf."""

    def __init__(self, truth: dict[str, list[int]], script: list[tuple[str, int]]):
        self.truth, self.script, self.calls = truth, list(script), 0

    def propose_drafts(self, requests, k):
        from arctic_jax.speculative.suffix_tree import Draft
        out = []
        for r in requests:
            kind, n = self.script[self.calls] if self.calls < len(self.script) else ("chain", 0)
            self.calls += 1
            rest = self.truth[r.request_id][len(r.output_ids):]
            wrong = [(t + 1) % CFG.vocab_size for t in rest]
            if kind == "chain":
                tokens, parents = rest[:n] + wrong[n:n + 1], list(range(-1, n))
            else:
                tokens = wrong[:2] + rest[:n] + wrong[n:n + 1]
                parents = [-1, 0, -1] + list(range(2, n + 2))
            m = min(len(tokens), len(parents), k)   # near the end the truth runs short
            out.append(Draft(token_ids=tuple(tokens[:m]), parents=tuple(parents[:m])))
        return out


def test_tree_acceptance_off_the_first_chain_recomputes_exactly(tiny_weights):
    """A tree accepted along a second branch: its tokens are output at once, and their KV (written
    in the branch's slots at the branch's positions) is recomputed by the next chunk, so the
    output equals plain greedy; along the first chain the KV stays in place. k = 6."""
    rng = np.random.default_rng(4)
    prompt = [int(t) for t in rng.integers(0, CFG.vocab_size, 11)]
    params = SamplingParams(max_tokens=24, temperature=0)
    (truth, *_), = run(tiny_engine(tiny_weights), [prompt], [params])
    engine = _record_trees(tiny_engine(tiny_weights, dict(SUFFIX_TREE, num_speculative_tokens=6)))
    engine.proposer = ScriptedTreeProposer({"req-1": truth},
                                           [("branch", 3), ("chain", 2), ("branch", 2), ("chain", 5)])
    computed = []
    original = engine.scheduler.update

    def update(step, *args, **kw):
        out = original(step, *args, **kw)
        computed.extend((c.draft_parents is not None, c.request.num_computed, c.request.num_known)
                        for c in step.chunks if c.draft)
        return out
    engine.scheduler.update = update
    (got, _, reason, runs), = run(engine, [prompt], [params])
    assert got == truth and reason == "length"
    # prefill 1 | branch: 3 accepted + 1 | recompute chunk + chain 2: 3 | branch 2: 3 | chain 5: 6
    assert runs[:5] == [1, 4, 3, 3, 6]
    # after a branch acceptance only the last token's KV is final (3 and 2 tokens to recompute)
    assert [known - num for _, num, known in computed[:4]] == [4, 1, 3, 1]
    s = engine.spec_stats
    assert s.num_accepted >= 3 + 2 + 2 + 5 and _branching(engine) == 2
    # by position = by depth: the scripted trees have 6, 3, 5 and 6 drafts at depths 4, 3, 3 and 6;
    # later proposals are one wrong token
    n = s.num_draft_steps
    assert s.drafted_by_position == [n, 4, 4, 2, 1, 1]
    assert s.num_drafted == 6 + 3 + 5 + 6 + (n - 4)


class RandomTreeProposer(StatelessProposer):
    """Random draft trees of k tokens (random parents, skewed often-wrong tokens), drawn from the
    request's seed and length (the same tree whatever shares the batch)."""

    def propose_drafts(self, requests, k):
        from arctic_jax.speculative.suffix_tree import Draft
        out = []
        for r in requests:
            rng = np.random.default_rng((r.seed, len(r.output_ids)))
            parents = [-1] + [int(rng.integers(-1, i)) for i in range(1, k)]
            tokens = rng.choice(SMALL.vocab_size, k, p=_SKEW)
            out.append(Draft(token_ids=tuple(int(t) for t in tokens), parents=tuple(parents)))
        return out


def test_tree_drafts_with_preemption_prefix_cache_and_abort(tiny_weights):
    """Draft trees accepted on and off their first chain while a small pool preempts and
    recomputes requests (prefix cache on), and one request is aborted mid-run: the others give
    the plain greedy tokens and every page comes back."""
    rng = np.random.default_rng(6)
    shared = [int(t) for t in rng.integers(0, CFG.vocab_size, 8)]
    prompts = [shared + [int(t) for t in rng.integers(0, CFG.vocab_size, 5)] for _ in range(5)]
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * len(prompts)
    want = run(tiny_engine(tiny_weights), prompts, params)
    engine = _record_trees(tiny_engine(tiny_weights, dict(SUFFIX_TREE, num_speculative_tokens=6),
                                       num_pages=26, max_model_len=64, page_buckets=(16,)))
    truth = {f"req-{i + 1}": w[0] for i, w in enumerate(want)}
    engine.proposer = ScriptedTreeProposer(truth, [("branch", 3), ("chain", 2), ("branch", 1)] * 200)
    preempted = []
    original = engine.scheduler._preempt
    engine.scheduler._preempt = lambda r: (preempted.append(r.request_id), original(r))[1]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    got = {i: [] for i in ids}
    for step in range(10_000):
        if not engine.has_unfinished():
            break
        if step == 6:
            assert engine.abort(ids[2])
        for o in engine.step():
            got[o.request_id].extend(o.new_token_ids)
    assert preempted, "the pool was meant to force preemption"
    assert _branching(engine) > 0 and engine.spec_stats.num_accepted > 0
    for i, (w, *_) in zip(ids, want, strict=True):
        if i == ids[2]:
            assert got[i] == w[:len(got[i])]
        else:
            assert got[i] == w
    allocator = engine.scheduler.allocator
    allocator.check_invariants()
    assert allocator.num_free() == allocator.num_allocatable
