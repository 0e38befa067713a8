"""n-gram prompt lookup, greedy verification and speculation statistics (host-side, no jax)."""
from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import pytest

from arctic_jax.speculative import (
    NgramProposer,
    Proposer,
    ProposerRequest,
    SpeculationStats,
    SpeculativeConfig,
    emitted_tokens,
    greedy_accept,
    make_proposer,
)
from arctic_jax.speculative.ngram import find_ngram_draft


@dataclasses.dataclass
class Req:
    request_id: str
    prompt_ids: list[int]
    output_ids: list[int] = dataclasses.field(default_factory=list)


def oracle_draft(ctx: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Brute force, straight from the definition."""
    L = len(ctx)
    for n in range(max_n, min_n - 1, -1):
        if n >= L:
            continue
        suffix = ctx[L - n:]
        for i in range(L - n - 1, -1, -1):
            if ctx[i:i + n] == suffix:
                return ctx[i + n:i + n + k]
    return []


def _draft(ctx, k, min_n, max_n):
    return find_ngram_draft(np.asarray(ctx, np.int32), k, min_n, max_n).tolist()


# ---------------------------------------------------------------- the search


def test_search_matches_oracle_on_random_sequences():
    rng = random.Random(1234)
    hits = misses = 0
    for _ in range(3000):
        vocab = rng.randint(2, 6)
        ctx = [rng.randrange(vocab) for _ in range(rng.randint(0, 70))]
        min_n = rng.randint(1, 5)
        max_n = rng.randint(min_n, 7)
        k = rng.randint(0, 9)
        want = oracle_draft(ctx, k, min_n, max_n)
        hits += bool(want)
        misses += not want and k > 0 and len(ctx) > 1
        assert _draft(ctx, k, min_n, max_n) == want, (ctx, k, min_n, max_n)
    assert hits > 1000 and misses > 200, (hits, misses)  # both outcomes well exercised


def test_no_match():
    assert _draft([1, 2, 3, 4, 5], 4, 1, 3) == []
    assert _draft([7, 7, 1, 2, 3], 4, 2, 3) == []  # 7 repeats, but not at the end


def test_longest_n_wins_over_a_later_shorter_match():
    #          0  1  2  3  4  5  6  7  8  9
    ctx = [5, 6, 7, 1, 9, 9, 7, 2, 6, 7]
    # last 2 tokens (6, 7) occur at i=1 -> next tokens 1, 9, 9
    # last 1 token (7) occurs latest at i=6 -> next tokens 2, 6, 7
    assert _draft(ctx, 3, 1, 2) == [1, 9, 9]
    assert _draft(ctx, 3, 1, 1) == [2, 6, 7]
    assert _draft(ctx, 3, 3, 3) == []  # (2, 6, 7) never occurred earlier


def test_latest_occurrence_wins():
    ctx = [1, 2, 10, 1, 2, 20, 1, 2, 30, 1, 2]
    assert _draft(ctx, 2, 2, 2) == [30, 1]
    assert _draft(ctx, 1, 1, 4) == [30]


def test_match_near_the_end_gives_fewer_than_k():
    ctx = [3, 4, 3, 4]
    # last 2 (3, 4) occurs at i=0 -> followed by (3, 4): only 2 tokens remain
    assert _draft(ctx, 5, 1, 2) == [3, 4]
    ctx = [8, 8]
    assert _draft(ctx, 4, 1, 4) == [8]  # only n=1 < len; occurrence at 0 is followed by one token


def test_n_at_least_len_is_skipped():
    assert _draft([], 3, 1, 4) == []
    assert _draft([5], 3, 1, 4) == []
    assert _draft([5, 5, 5], 3, 3, 4) == []  # n=3 would be the whole context
    assert _draft([5, 5, 5], 3, 2, 4) == [5]  # n=2 at i=0, followed by one token
    assert _draft([1, 2, 3], 0, 1, 2) == []  # k = 0


def test_4k_context_search_is_fast():
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 32000, 4096).astype(np.int32)
    ctx[-4:] = ctx[1000:1004]  # a 4-gram match far back, plus random 1-gram matches
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        find_ngram_draft(ctx, 8, 1, 4)
        times.append(time.perf_counter() - t0)
    assert find_ngram_draft(ctx, 3, 1, 4).tolist() == ctx[1004:1007].tolist()
    assert min(times) < 1e-3, f"best of 30: {min(times) * 1e3:.3f} ms"


# ---------------------------------------------------------------- the stateful proposer


def test_proposer_follows_growing_requests():
    rng = random.Random(7)
    prop = NgramProposer(2, 4)
    reqs = [Req(f"r{i}", [rng.randrange(5) for _ in range(rng.randint(0, 20))]) for i in range(6)]
    for _ in range(60):
        k = rng.randint(1, 6)
        drafts = prop.propose(reqs, k)
        assert drafts == [oracle_draft(r.prompt_ids + r.output_ids, k, 2, 4) for r in reqs]
        for r in reqs:
            new = [rng.randrange(5) for _ in range(rng.randint(1, 3))]
            r.output_ids += new
            prop.on_tokens(r, new)
    assert prop.num_tracked == 6
    for r in reqs:
        prop.on_finish(r)
        prop.on_finish(r)  # twice is harmless
    assert prop.num_tracked == 0


def test_proposer_unseen_request_and_missed_updates():
    prop = NgramProposer(1, 3)
    r = Req("a", [1, 2, 3, 1, 2], [3])
    prop.on_tokens(r, [3])  # unseen: ignored, state built from the request on propose
    assert prop.propose([r], 4) == [[1, 2, 3]]
    r.output_ids += [9, 1, 2]  # engine forgot on_tokens: topped up from output_ids
    assert prop.propose([r], 4) == [oracle_draft(r.prompt_ids + r.output_ids, 4, 1, 3)]


def test_proposer_recompute_after_preemption_feeds_tokens_twice():
    prop = NgramProposer(1, 3)
    r = Req("a", [4, 5, 6, 4, 5], [])
    assert prop.propose([r], 2) == [[6, 4]]
    r.output_ids += [6, 7]
    prop.on_tokens(r, [6, 7])
    # preempted and recomputed: output_ids unchanged but the tokens are reported again
    prop.on_tokens(r, [6, 7])
    assert prop.propose([r], 3) == [oracle_draft(r.prompt_ids + r.output_ids, 3, 1, 3)]
    r.output_ids += [4]
    prop.on_tokens(r, [4])
    assert prop.propose([r], 3) == [[5, 6, 7]]


def test_proposer_rebuilds_when_content_disagrees():
    prop = NgramProposer(1, 2)
    r = Req("a", [1, 2, 3, 1, 2], [])
    prop.propose([r], 2)
    prop.on_tokens(r, [8])     # a token that never reached output_ids ...
    r.output_ids += [3]        # ... while the request has a different one: same length
    assert prop.propose([r], 2) == [[1, 2]]
    prop.on_finish(r)
    r2 = Req("a", [9, 9, 9], [])  # id reused by a new request
    prop.propose([r], 2)
    assert prop.propose([r2], 2) == [[9]]


def test_proposer_long_growth_reallocates_buffer():
    prop = NgramProposer(3, 3)
    r = Req("long", [0, 1, 2])
    rng = random.Random(3)
    for _ in range(300):
        new = [rng.randrange(3)]
        r.output_ids += new
        prop.on_tokens(r, new)
    assert prop.propose([r], 5) == [oracle_draft(r.prompt_ids + r.output_ids, 5, 3, 3)]


def test_proposer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="prompt_lookup_min=3 must be <= prompt_lookup_max=2"):
        NgramProposer(3, 2)
    with pytest.raises(ValueError, match="prompt_lookup_min must be an integer >= 1"):
        NgramProposer(0, 2)
    with pytest.raises(ValueError, match="k must be a non-negative integer"):
        NgramProposer(1, 2).propose([Req("a", [1])], -1)


def test_make_proposer_and_protocols():
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3,
                                       "prompt_lookup_max": 4, "prompt_lookup_min": 2})
    prop = make_proposer(cfg)
    assert isinstance(prop, NgramProposer) and isinstance(prop, Proposer)
    assert (prop.prompt_lookup_min, prop.prompt_lookup_max) == (2, 4)
    assert isinstance(Req("a", [1]), ProposerRequest)


def test_engine_request_satisfies_proposer_request():
    from arctic_jax.engine.request import Request
    from arctic_jax.sampling import SamplingParams
    r = Request(request_id="x", prompt_ids=[1, 2, 1], params=SamplingParams(), seed=0)
    assert isinstance(r, ProposerRequest)
    assert NgramProposer(1, 2).propose([r], 3) == [[2, 1]]


# ---------------------------------------------------------------- verification


@pytest.mark.parametrize("drafts, target, accepted", [
    ([], [7], 0),
    ([1, 2, 3], [1, 2, 3, 4], 3),
    ([1, 2, 3], [1, 2, 9, 4], 2),
    ([1, 2, 3], [5, 2, 3, 4], 0),
    ([1, 2, 3], [1, 5, 3, 4], 1),  # a later equal token after a miss does not count
    ([4], [4, 4], 1),
])
def test_greedy_accept_table(drafts, target, accepted):
    assert greedy_accept(drafts, target) == accepted
    assert emitted_tokens(drafts, target) == target[:accepted + 1]
    assert emitted_tokens(np.array(drafts, np.int32), np.array(target, np.int64)) == target[:accepted + 1]


def test_greedy_accept_length_mismatch():
    with pytest.raises(ValueError, match="len\\(target\\) == len\\(drafts\\) \\+ 1"):
        greedy_accept([1, 2], [1, 2])
    with pytest.raises(ValueError, match="3 target tokens for 1 drafts"):
        emitted_tokens([1], [1, 2, 3])


def test_emitted_tokens_equal_greedy_decoding():
    """Against a toy deterministic 'model': speculation emits the plain greedy continuation."""
    rng = random.Random(5)
    table = {i: rng.randrange(6) for i in range(6)}  # next token = table[last token]

    def argmax_after(tokens):
        return table[tokens[-1]]

    prop = NgramProposer(1, 3)
    plain = [0]
    for _ in range(40):
        plain.append(argmax_after(plain))
    r = Req("t", [0])
    while len(r.output_ids) < 40:
        drafts = prop.propose([r], 4)[0]
        ctx = r.prompt_ids + r.output_ids
        target = [argmax_after(ctx + drafts[:i]) for i in range(len(drafts) + 1)]
        new = emitted_tokens(drafts, target)[:40 - len(r.output_ids)]
        r.output_ids += new
        prop.on_tokens(r, new)
    assert r.prompt_ids + r.output_ids == plain


# ---------------------------------------------------------------- statistics


def test_stats_by_hand():
    s = SpeculationStats()
    s.on_verified(3, 2)          # emits 3
    s.on_verified(3, 0)          # emits 1
    s.on_verified(1, 1, 1)       # stop string cut the run: emits 1
    s.on_verified(0, 0)          # no draft found: emits 1
    s.on_plain_decode(4)         # 4 request-steps, 1 token each
    assert (s.num_drafted, s.num_accepted, s.num_steps, s.num_emitted) == (7, 3, 8, 10)
    assert s.drafted_by_position == [3, 2, 2]
    assert s.accepted_by_position == [2, 1]
    assert s.num_draft_steps == 3
    assert s.acceptance_rate == pytest.approx(3 / 7)
    assert s.acceptance_rate_by_position == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert s.mean_tokens_per_step == pytest.approx(10 / 8)
    assert s.mean_acceptance_length == pytest.approx(1 + 3 / 3)
    d = s.as_dict()
    assert d["accepted_by_position"] == [2, 1, 0]
    assert d["num_drafted_tokens"] == 7 and d["acceptance_rate_by_position"][0] == pytest.approx(2 / 3)


def test_stats_merge_and_empty():
    e = SpeculationStats()
    assert (e.acceptance_rate, e.mean_tokens_per_step, e.mean_acceptance_length) == (0.0, 0.0, 0.0)
    assert e.acceptance_rate_by_position == []
    a, b = SpeculationStats(), SpeculationStats()
    a.on_verified(2, 2)
    b.on_verified(4, 1)
    b.on_plain_decode(2)
    m = a.merge(b)
    assert m.as_dict() == {
        "num_drafted_tokens": 6, "num_accepted_tokens": 3, "num_steps": 4, "num_draft_steps": 2,
        "num_emitted_tokens": 7, "drafted_by_position": [2, 2, 1, 1], "accepted_by_position": [2, 1, 0, 0],
        "acceptance_rate": 0.5, "acceptance_rate_by_position": [1.0, 0.5, 0.0, 0.0],
        "mean_tokens_per_step": 7 / 4, "mean_acceptance_length": 2.5,
    }
    assert a.num_drafted == 2 and b.num_drafted == 4  # merge does not mutate


def test_stats_reject_inconsistent_records():
    s = SpeculationStats()
    with pytest.raises(ValueError, match="num_accepted=3 exceeds num_drafted=2"):
        s.on_verified(2, 3)
    with pytest.raises(ValueError, match="num_emitted=4 exceeds num_accepted \\+ 1 = 3"):
        s.on_verified(2, 2, 4)
    with pytest.raises(ValueError, match="num_drafted must be a non-negative integer"):
        s.on_verified(-1, 0)
    with pytest.raises(ValueError, match="need num_accepted <= depth <= num_drafted, got 2, 1, 3"):
        s.on_verified(3, 2, depth=1)
    with pytest.raises(ValueError, match="num_emitted=3 exceeds num_steps=2"):
        s.on_plain_decode(2, 3)
    assert s == SpeculationStats()  # nothing half-recorded
