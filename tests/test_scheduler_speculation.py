"""Host-only tests of the scheduler's speculative decoding (no model, no jax).

A toy paged "device" stands in for the model: the KV of a position is the token id written there
(through the request's page table), and the target's next token after position p is a hash of the
tokens read back at positions 0..p. Greedy output is therefore known exactly, and a page that holds
the wrong content (a stale page, an unverified draft registered in the prefix cache, a missing
reservation) changes the output.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from arctic_jax.engine.request import FinishReason, Request, RequestStatus
from arctic_jax.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from arctic_jax.sampling import SamplingParams

VOCAB = 64
EOS = 0
_MOD = (1 << 61) - 1


# ------------------------------------------------------------------ toy model
def _roll(state: int, token: int) -> int:
    return (state * 1_000_003 + int(token) + 1) % _MOD


def _emit(state: int) -> int:
    return ((state * 2_654_435_761) >> 17) % VOCAB


def greedy(prompt: list[int], n: int) -> list[int]:
    """The toy model's greedy continuation of ``prompt``: ``n`` tokens."""
    s = 0
    for t in prompt:
        s = _roll(s, t)
    out = []
    for _ in range(n):
        out.append(_emit(s))
        s = _roll(s, out[-1])
    return out


def expected_output(prompt: list[int], params: SamplingParams, max_model_len: int,
                    eos: frozenset[int] = frozenset({EOS})) -> list[int]:
    """Greedy output of one request without speculation: cut after EOS / a stop token id,
    at ``max_tokens`` or at the model length."""
    out = []
    for t in greedy(prompt, min(params.max_tokens, max_model_len - len(prompt))):
        out.append(t)
        if (t in eos and not params.ignore_eos) or t in params.stop_token_ids:
            break
    return out


class ToyDevice:
    """Runs scheduled steps on a fake paged KV cache (``kv[page, offset]`` = token id, -1 unwritten).

    ``run`` executes a step at dispatch time (steps run in launch order, as on a device) and returns
    the target tokens, ``chunk.num_logits`` rows per chunk. A plain sampling chunk writes its token
    into the request's row of the token buffer, which the next decode reads when ``from_slot``.
    With ``truth`` (request -> its full true token sequence) every known position of a chunk's
    context is checked against it as it is read.
    """

    def __init__(self, config: SchedulerConfig, truth=None):
        self.page_size = config.page_size
        self.kv = np.full((config.num_pages, config.page_size), -1, np.int64)
        self.slots: list[int | None] = [None] * config.max_num_seqs
        self.truth = truth

    def run(self, step: ScheduledStep) -> list[int]:
        rows: list[int] = []
        ps = self.page_size
        for c in step.chunks:
            r = c.request
            pages = list(r.pages)
            end = c.start + c.num_tokens
            assert len(pages) * ps >= end, f"{r.request_id}: {len(pages)} pages for {end} positions"
            assert len(c.host_tokens) == c.num_tokens
            tokens = list(c.host_tokens)
            assert not (c.from_slot and c.draft), "drafts need the last token on the host"
            if c.from_slot:
                token = self.slots[r.token_slot]
                assert token is not None, f"{r.request_id}: decode from an empty token slot"
                tokens[c.num_tokens - len(c.draft) - 1] = token
            for i, t in enumerate(tokens):
                p = c.start + i
                self.kv[pages[p // ps], p % ps] = t
            context = [int(self.kv[pages[p // ps], p % ps]) for p in range(end)]
            assert min(context) >= 0, f"{r.request_id}: reads unwritten KV"
            if self.truth is not None:
                known = end - len(c.draft)
                assert context[:known] == self.truth(r)[:known], f"{r.request_id}: wrong KV"
            if not c.sample:
                continue
            s, targets = 0, []
            for p, t in enumerate(context):
                s = _roll(s, t)
                if p >= end - c.num_logits:
                    targets.append(_emit(s))
            assert len(targets) == c.num_logits
            rows.extend(targets)
            self.slots[r.token_slot] = None if c.draft else targets[0]
        assert len(rows) == step.num_logits
        return rows


# ------------------------------------------------------------------ helpers
PS = 4
PROMPT = [1, 2, 3, 4, 5, 6]
FIRST = 50  # the token sampled after the prompt


def _params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 100, "temperature": 0.0, **kw})


def _config(**kw) -> SchedulerConfig:
    base = dict(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, page_size=PS,
                num_pages=64, enable_prefix_caching=False)
    return SchedulerConfig(**{**base, **kw})


def _decode_ready(sched: Scheduler, rid: str, prompt: list[int], first: int,
                  params: SamplingParams | None = None) -> Request:
    """Add a request and run its prefill (chunked if the budget says so) with ``first`` as the
    sampled token: afterwards num_tokens = len(prompt) + 1 and num_computed = len(prompt)."""
    req = Request(rid, list(prompt), params or _params(), seed=0)
    sched.add(req)
    while not req.output_ids:
        step = sched.schedule()
        assert [c.request for c in step.chunks] == [req]
        sched.update(step, [first] * step.num_logits)
    assert (req.num_tokens, req.num_computed) == (len(prompt) + 1, len(prompt))
    return req


def _start_together(sched: Scheduler, *specs: tuple[str, list[int], int]) -> list[Request]:
    """Admit (request id, prompt, first token) requests in one step and apply their first tokens."""
    reqs = [Request(rid, list(prompt), _params(), seed=0) for rid, prompt, _ in specs]
    for r in reqs:
        sched.add(r)
    step = sched.schedule()
    assert [c.request for c in step.chunks] == reqs and all(c.sample for c in step.chunks)
    sched.update(step, [first for _, _, first in specs])
    return reqs


# ------------------------------------------------------------------ 1. verify tables
@dataclasses.dataclass(frozen=True)
class Case:
    drafts: tuple[int, ...]
    carried: tuple[int, ...]           # drafts the chunk carries after the caps
    targets: tuple[int, ...]           # target rows (1 + len(carried))
    appended: tuple[int, ...]          # tokens update appends
    accepted: int
    num_computed: int | None           # after update; None when the request finished
    pages: int                         # pages held after update (0 when finished)
    reason: FinishReason | None = None
    config: tuple = ()                 # SchedulerConfig overrides
    params: tuple = ()                 # SamplingParams overrides


D = (10, 11, 12)
# Prompt of 6 tokens plus FIRST: num_tokens 7, num_computed 6, 2 pages of 4. A chunk with k drafts
# covers positions 6..6+k and needs ceil((7 + k) / 4) pages; after verifying a drafts,
# num_computed = 7 + a (= num_tokens - 1).
CASES = {
    "all_accepted_plus_bonus": Case(D, D, (10, 11, 12, 13), (10, 11, 12, 13), 3, 10, 3),
    "none_accepted": Case(D, D, (20, 21, 22, 23), (20,), 0, 7, 3),
    "first_accepted": Case(D, D, (10, 21, 22, 23), (10, 21), 1, 8, 3),
    "two_accepted": Case(D, D, (10, 11, 22, 23), (10, 11, 22), 2, 9, 3),
    "later_draft_matches_after_a_miss": Case(D, D, (10, 30, 12, 13), (10, 30), 1, 8, 3),
    "no_drafts": Case((), (), (10,), (10,), 0, 7, 2),
    "capped_by_token_budget": Case(D, (10, 11), (10, 11, 12), (10, 11, 12), 2, 9, 3,
                                   config=(("max_num_batched_tokens", 3), ("max_num_seqs", 2))),
    "capped_by_max_tokens": Case(D, (10,), (10, 11), (10, 11), 1, None, 0, FinishReason.LENGTH,
                                 params=(("max_tokens", 3),)),
    "max_tokens_reached_at_bonus": Case(D, (10, 11), (10, 11, 12), (10, 11, 12), 2, None, 0,
                                        FinishReason.LENGTH, params=(("max_tokens", 4),)),
    "max_tokens_cap_then_reject": Case(D, (10, 11), (10, 21, 22), (10, 21), 1, 8, 3,
                                       params=(("max_tokens", 4),)),
    "max_tokens_leaves_no_draft": Case(D, (), (10,), (10,), 0, None, 0, FinishReason.LENGTH,
                                       params=(("max_tokens", 2),)),
    "capped_by_max_model_len": Case(D, (10,), (10, 11), (10, 11), 1, None, 0, FinishReason.LENGTH,
                                    config=(("max_model_len", 9),)),
    "max_model_len_reached_at_bonus": Case(D, (10, 11), (10, 11, 12), (10, 11, 12), 2, None, 0,
                                           FinishReason.LENGTH, config=(("max_model_len", 10),)),
    "eos_inside_accepted_run": Case((10, EOS, 12), (10, EOS, 12), (10, EOS, 12, 13), (10, EOS), 3,
                                    None, 0, FinishReason.STOP),
    "eos_as_bonus": Case((10, 11), (10, 11), (10, 11, EOS), (10, 11, EOS), 2, None, 0,
                         FinishReason.STOP),
    "eos_as_correction": Case(D, D, (10, EOS, 12, 13), (10, EOS), 1, None, 0, FinishReason.STOP),
    "rejected_eos_draft": Case((EOS, 11, 12), (EOS, 11, 12), (7, 11, 12, 13), (7,), 0, 7, 3),
    "eos_ignored": Case((10, EOS, 12), (10, EOS, 12), (10, EOS, 12, 13), (10, EOS, 12, 13), 3, 10,
                        3, params=(("ignore_eos", True),)),
    "stop_token_inside_run": Case(D, D, (10, 11, 12, 13), (10, 11), 3, None, 0, FinishReason.STOP,
                                  params=(("stop_token_ids", (11,)),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_verify_table(name):
    case = CASES[name]
    assert len(case.targets) == len(case.carried) + 1
    sched = Scheduler(_config(**dict(case.config)), eos_token_ids=[EOS])
    req = _decode_ready(sched, "r", PROMPT, FIRST, _params(**dict(case.params)))

    req.spec_tokens = list(case.drafts)
    step = sched.schedule()
    (chunk,) = step.chunks
    assert req.spec_tokens == []  # consumed
    assert chunk.draft == case.carried and any(c.draft for c in step.chunks) == bool(case.carried)
    assert (chunk.start, chunk.num_tokens, chunk.num_logits) == (6, 1 + len(case.carried),
                                                                   1 + len(case.carried))
    assert chunk.host_tokens == (FIRST, *case.carried) and not chunk.from_slot and chunk.sample
    reserved = -(-(7 + len(case.carried)) // PS)
    assert len(req.pages) == reserved
    assert sched.allocator.stats()["num_used_pages"] == reserved

    logprobs = [-0.5 - i for i in range(len(case.targets))]
    update = sched.update(step, list(case.targets), logprobs)

    n = len(case.appended)
    assert req.output_ids == [FIRST, *case.appended]
    assert req.output_logprobs == logprobs[:n]  # only the kept rows' logprobs (none for FIRST)
    assert req.pending == 0
    assert update.touched == [req]
    if case.carried:
        (v,) = update.verified
        assert (v.request, v.drafted, v.accepted, v.emitted) == (req, len(case.carried),
                                                                  case.accepted, n)
    else:
        assert update.verified == []
    assert req.finish_reason == case.reason
    assert len(req.pages) == case.pages
    assert sched.allocator.stats()["num_used_pages"] == case.pages
    if case.reason is None:
        assert req.status is RequestStatus.RUNNING
        assert req.num_computed == case.num_computed == req.num_tokens - 1
        step = sched.schedule()  # the next step decodes the last appended token
        (chunk,) = step.chunks
        assert (chunk.start, chunk.host_tokens, chunk.draft) == (case.num_computed,
                                                                 (case.appended[-1],), ())
    else:
        assert req.finished and not sched.running and not sched.requests
        assert sched.allocator.num_free() == sched.config.num_pages
        assert not sched.schedule().chunks


def test_drafts_only_on_a_chunk_that_reaches_the_known_last_token():
    """Drafts are dropped (and consumed) on a prefill chunk that stops short of the end, and on a
    decode whose last token is still pending on the device."""
    sched = Scheduler(_config(max_num_batched_tokens=4, max_num_seqs=2))
    req = Request("r", list(range(1, 10)), _params(), seed=0)  # 9 tokens: chunks of 4, 4, 1
    sched.add(req)
    step = sched.schedule()  # admission chunk
    sched.update(step, [])
    req.spec_tokens = [7, 7]
    step = sched.schedule()  # positions 4..7, does not reach the last token
    assert [(c.start, c.num_tokens, c.draft, c.sample) for c in step.chunks] == [(4, 4, (), False)]
    assert req.spec_tokens == []
    sched.update(step, [])
    step = sched.schedule()  # last prompt token: samples, no drafts were proposed
    assert step.chunks[0].num_logits == 1
    # Overlap: the next decode is scheduled before this step's token reaches the host.
    req.spec_tokens = [7, 7]
    step2 = sched.schedule()
    (c,) = step2.chunks
    assert c.from_slot and c.draft == () and c.num_logits == 1 and req.spec_tokens == []
    assert req.pending == 2


def test_final_prefill_chunk_may_carry_drafts():
    """A chunk of several tokens that reaches the known last token verifies drafts too; logits
    rows are the last token's and the drafts'."""
    sched = Scheduler(_config(max_num_batched_tokens=8, max_num_seqs=2))
    req = Request("r", list(range(1, 11)), _params(), seed=0)  # 10 tokens: chunks of 8, 2
    sched.add(req)
    sched.update(sched.schedule(), [])
    req.spec_tokens = [40, 41, 42]
    step = sched.schedule()
    (c,) = step.chunks
    assert (c.start, c.num_tokens, c.draft, c.num_logits) == (8, 5, (40, 41, 42), 4)
    assert c.host_tokens == (9, 10, 40, 41, 42)
    sched.update(step, [40, 33, 34, 35])
    assert req.output_ids == [40, 33]
    assert req.num_computed == 11 == req.num_tokens - 1


# ------------------------------------------------------------------ 2. page reservation
@pytest.mark.parametrize("accepted", [0, 2, 5])
def test_drafts_reserve_pages_and_rollback_keeps_them(accepted):
    # Prompt of 7 + FIRST: num_tokens 8, num_computed 7, pages for 7 positions = 2 (a page
    # boundary: the next token starts page 2). 5 drafts cover positions 7..12: pages 0..3.
    sched = Scheduler(_config(num_pages=6))
    req = _decode_ready(sched, "r", [1, 2, 3, 4, 5, 6, 7], FIRST)
    assert len(req.pages) == 2
    drafts = [20, 21, 22, 23, 24]
    req.spec_tokens = list(drafts)
    step = sched.schedule()
    assert step.chunks[0].num_tokens == 6
    assert len(req.pages) == 4 and sched.allocator.num_free() == 2
    assert req.num_computed == 13  # past the drafts while the verify is in flight
    pages = list(req.pages)
    targets = drafts[:accepted] + [30 + i for i in range(6 - accepted)]
    sched.update(step, targets)
    # Verified: 8 known + accepted + 1; KV computed for all but the newest token.
    assert req.num_tokens == 9 + accepted
    assert req.num_computed == 8 + accepted == req.num_tokens - 1
    assert req.pages == pages and sched.allocator.num_free() == 2  # kept for the next positions
    # Decoding on to position 15 allocates nothing more; position 16 takes a fifth page.
    while req.num_computed < 16:
        step = sched.schedule()
        assert len(req.pages) == (4 if req.num_computed <= 16 else 5)
        sched.update(step, [31])
    assert len(req.pages) == 4
    sched.update(sched.schedule(), [31])
    assert len(req.pages) == 5 and sched.allocator.num_free() == 1


def test_drafts_never_preempt_another_request():
    # 4 pages of 4. A and B each hold 2 pages (7 prompt tokens + 1 output). A's 2 drafts would need a
    # third page, which only preempting B could free: the drafts are dropped instead, both decode.
    sched = Scheduler(_config(num_pages=4))
    a, b = _start_together(sched, ("a", [1, 2, 3, 4, 5, 6, 7], 50), ("b", [9, 8, 7, 6, 5, 4, 3], 51))
    a.spec_tokens = [60, 61]
    step = sched.schedule()
    assert step.preempted == ()
    assert [c.request for c in step.chunks] == [a, b] and step.chunks[0].draft == ()
    assert len(a.pages) == 2 and len(b.pages) == 2
    sched.update(step, [60, 52])
    assert a.output_ids == [50, 60] and b.output_ids == [51, 52] and a.num_computed == 8


def test_drafts_take_free_pages_up_to_what_is_free():
    # 5 pages of 4: one is free. A (6 prompt tokens + 1 output, 6 computed) decodes position 6;
    # its 6 drafts are cut to positions 7..11: one slot left in its own 2 pages plus the free page.
    # B is not preempted.
    sched = Scheduler(_config(num_pages=5))
    a, b = _start_together(sched, ("a", [1, 2, 3, 4, 5, 6], 50), ("b", [9, 8, 7, 6, 5, 4, 3], 51))
    a.spec_tokens = [60, 61, 62, 63, 64, 65]
    step = sched.schedule()
    assert step.preempted == () and step.chunks[0].draft == (60, 61, 62, 63, 64)
    assert len(a.pages) == 3 and sched.allocator.num_free() == 0


# ------------------------------------------------------------------ 3. prefix cache
def test_prefix_cache_registers_only_verified_tokens():
    sched = Scheduler(_config(enable_prefix_caching=True, num_pages=16))
    alloc = sched.allocator
    req = _decode_ready(sched, "r", PROMPT, FIRST)  # positions 0..5 prompt, 6 FIRST
    assert alloc.cached_prefix_tokens(req.all_ids + [0]) == 4  # page 0 only (6 computed)
    # Drafts at positions 7..11: the first two right, then wrong. Page 2 (positions 8..11) gets
    # the KV of [d2, d3, d4, d5] but only d2 is verified.
    drafts = [40, 41, 42, 43, 44]
    req.spec_tokens = list(drafts)
    step = sched.schedule()
    assert len(req.pages) == 3
    # In flight: only known tokens can be registered (the last token, position 6, included).
    sched.update(step, [40, 41, 52, 53, 54, 55])
    assert req.output_ids == [FIRST, 40, 41, 52] and req.num_computed == 9
    verified = PROMPT + [FIRST, 40, 41, 52]
    with_wrong_draft = PROMPT + [FIRST, 40, 41, 42, 43, 44, 0]
    assert alloc.cached_prefix_tokens(verified + [0, 0, 0]) == 8  # pages 0, 1
    assert alloc.cached_prefix_tokens(with_wrong_draft) == 8      # page 2 never registered
    assert req.num_registered_pages == 2
    # A new request whose prompt is the wrong-draft sequence hits 8 tokens, not 12.
    other = Request("o", with_wrong_draft, _params(), seed=0)
    sched.add(other)
    step = sched.schedule()
    assert [(c.request.request_id, c.start) for c in step.chunks] == [("r", 9), ("o", 8)]
    assert other.num_cached_prompt == 8 and other.pages[:2] == req.pages[:2]
    assert other.pages[2] != req.pages[2]
    sched.update(step, [56, 60])  # r: position 9 = 52 verified; o samples
    # o computed its own KV for [41, 42, 43, 44]: that page is cached (o's, not r's).
    assert alloc.is_cached(other.pages[2]) and not alloc.is_cached(req.pages[2])
    # r decodes positions 10 and 11 with verified tokens: its page 2 registers with them.
    sched.update(sched.schedule(), [57, 61])
    assert req.num_computed == 11 and req.num_registered_pages == 2
    assert not alloc.is_cached(req.pages[2])
    sched.update(sched.schedule(), [58, 62])
    assert req.num_computed == 12 and req.num_registered_pages == 3
    assert alloc.is_cached(req.pages[2]) and alloc.cached_prefix_tokens(req.all_ids) == 12
    alloc.check_invariants()


def test_prefix_cache_after_all_accepted_run_fills_pages():
    sched = Scheduler(_config(enable_prefix_caching=True))
    req = _decode_ready(sched, "r", PROMPT, FIRST)
    req.spec_tokens = [40, 41, 42, 43, 44, 45]  # positions 7..12
    step = sched.schedule()
    sched.update(step, [40, 41, 42, 43, 44, 45, 46])
    # Known: 14 tokens, computed 13 -> pages 0..2 full and verified.
    assert req.num_computed == 13 and req.num_registered_pages == 3
    assert sched.allocator.cached_prefix_tokens(req.all_ids) == 12


# ------------------------------------------------------------------ 4. verify in flight
def test_request_with_verify_in_flight_is_skipped():
    sched = Scheduler(_config())
    req = _decode_ready(sched, "r", PROMPT, FIRST)
    req.spec_tokens = [40, 41, 42]
    step1 = sched.schedule()
    pages = list(req.pages)
    req.spec_tokens = [40, 41, 42]  # a proposer would not, but the scheduler must cope
    step2 = sched.schedule()
    assert step2.chunks == () and req.spec_tokens == []
    assert req.pages == pages and req.num_computed == 10 and req.pending == 1
    sched.update(step2, [])
    sched.update(step1, [40, 71, 72, 73])
    assert req.output_ids == [FIRST, 40, 71] and req.num_computed == 8
    (c,) = sched.schedule().chunks
    assert (c.start, c.host_tokens, c.from_slot) == (8, (71,), False)


def test_abort_and_preemption_while_verify_in_flight():
    """B's verify is in flight when A's next page preempts it: B waits, is not admitted while
    its result is pending, keeps its verified tokens, and is recomputed from them later. A is
    then aborted while its step is in flight; the rows of the steps stay aligned."""
    sched = Scheduler(_config(num_pages=4))
    a, b = _start_together(sched, ("a", [1, 2, 3, 4, 5, 6, 7], 50),  # 8 tokens, 2 pages
                           ("b", [9, 8, 7, 6, 5], 60))             # 6 tokens, 2 pages
    b.spec_tokens = [61, 62]
    s1 = sched.schedule()  # A decodes position 7; B verifies positions 5..7
    assert [(c.request, c.draft) for c in s1.chunks] == [(a, ()), (b, (61, 62))]
    assert sched.allocator.num_free() == 0
    s2 = sched.schedule()  # A's pending token at position 8 needs a third page: B goes
    assert s2.preempted == ("b",) and [c.request for c in s2.chunks] == [a]
    assert s2.chunks[0].from_slot
    assert b.status is RequestStatus.WAITING and b.pending == 1 and b.pages == []
    assert b.token_slot == -1 and list(sched.waiting) == [b]
    assert sched.allocator.num_free() == 1  # B's 2 pages freed, A took one
    s3 = sched.schedule()  # A again from the slot; B still pending: not admitted
    assert [c.request for c in s3.chunks] == [a] and b.status is RequestStatus.WAITING
    sched.update(s1, [51, 61, 63, 64])
    assert a.output_ids == [50, 51]
    assert b.output_ids == [60, 61, 63] and b.num_computed == 0 and b.pending == 0
    assert sched.abort("a") is a and a.pages == []
    s4 = sched.schedule()  # B is readmitted and recomputes every known token
    (c,) = s4.chunks
    assert c.request is b and (c.start, c.num_tokens) == (0, 8)
    assert c.host_tokens == (9, 8, 7, 6, 5, 60, 61, 63)
    update = sched.update(s2, [52])  # A aborted: its row is skipped
    assert update.touched == [] and a.output_ids == [50, 51]
    sched.update(s3, [53])
    sched.update(s4, [65])
    assert b.output_ids == [60, 61, 63, 65] and b.num_computed == 8
    sched.abort("b")
    assert sched.allocator.num_free() == 4 and not sched.has_work()
    sched.allocator.check_invariants()


def test_abort_of_a_verifying_request_keeps_rows_aligned():
    sched = Scheduler(_config())
    a, b = _start_together(sched, ("a", PROMPT, 50), ("b", [7, 7, 7], 60))
    a.spec_tokens = [1, 2, 3]
    b.spec_tokens = [4]
    step = sched.schedule()
    assert step.num_logits == 6
    sched.abort("a")
    update = sched.update(step, [1, 2, 3, 9, 4, 8])  # rows 0..3 are A's
    assert update.touched == [b] and [v.request for v in update.verified] == [b]
    assert b.output_ids == [60, 4, 8] and a.output_ids == [50]
    assert a.finish_reason is FinishReason.ABORT


# ------------------------------------------------------------------ 5. random soak
@dataclasses.dataclass
class _Tracked:
    request: Request
    truth: list[int]       # prompt + greedy continuation up to max_model_len
    expected: list[int]    # the output without speculation


def _draft(rng: random.Random, truth: list[int], pos: int, k: int, right: int) -> list[int]:
    """k drafts for positions pos.., the first ``right`` of them correct, the rest wrong."""
    out = []
    for i in range(k):
        p = pos + i
        if i < right and p < len(truth):
            out.append(truth[p])
        else:
            t = rng.randrange(VOCAB)
            while p < len(truth) and t == truth[p]:
                t = rng.randrange(VOCAB)
            out.append(t)
    return out


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "nocache"])
def test_random_speculative_soak(overlap, prefix_caching):
    rng = random.Random(1234 + 2 * overlap + prefix_caching)
    cfg = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, max_model_len=48, page_size=PS,
                          num_pages=16, enable_prefix_caching=prefix_caching)
    sched = Scheduler(cfg, eos_token_ids=[EOS])
    tracked: dict[str, _Tracked] = {}
    device = ToyDevice(cfg, truth=lambda r: tracked[r.request_id].truth)
    bases = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(8, 20))] for _ in range(3)]

    def new_request(i: int) -> None:
        kind = rng.random()
        if kind < 0.4 or not tracked:
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 25))]
        elif kind < 0.7:
            prompt = rng.choice(bases) + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 8))]
        else:  # an earlier request's prompt and part of its greedy output: hits its decode pages
            earlier = rng.choice(list(tracked.values()))
            prompt = earlier.truth[:len(earlier.request.prompt_ids) + rng.randrange(0, 24)]
        prompt = prompt[:cfg.max_model_len - 2]
        params = _params(max_tokens=rng.randrange(1, 31), ignore_eos=rng.random() < 0.2,
                         stop_token_ids=tuple(rng.sample(range(1, VOCAB), rng.randrange(0, 3))))
        req = Request(f"r{i}", prompt, params, seed=0)
        truth = prompt + greedy(prompt, cfg.max_model_len - len(prompt))
        tracked[req.request_id] = _Tracked(req, truth, expected_output(prompt, params,
                                                                       cfg.max_model_len))
        sched.validate(len(prompt))
        sched.add(req)

    counts = dict(drafted=0, accepted=0, rejected_runs=0, preempted=0, aborted_in_flight=0,
                  aborted_verify_in_flight=0, emitted_short=0)
    added = 0
    inflight: tuple[ScheduledStep, list[int]] | None = None

    def apply(step: ScheduledStep, rows: list[int]) -> None:
        update = sched.update(step, rows)
        for v in update.verified:
            assert 0 <= v.accepted <= v.drafted and 1 <= v.emitted <= v.accepted + 1
            assert v.emitted == v.accepted + 1 or v.request.finished
            counts["drafted"] += v.drafted
            counts["accepted"] += v.accepted
            counts["rejected_runs"] += v.accepted < v.drafted
            counts["emitted_short"] += v.emitted < v.accepted + 1
        sched.allocator.check_invariants()
        for r in sched.running:  # registered pages hold exactly the verified tokens
            t = tracked[r.request_id].truth
            for i in range(r.num_registered_pages):
                assert device.kv[r.pages[i]].tolist() == t[i * PS:(i + 1) * PS]
            assert len(r.pages) <= cfg.max_pages_per_seq

    for _ in range(20_000):
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if added < 200:
                new_request(added)
                added += 1
        # Half the time read the step in flight first, as the engine does when it samples for a
        # request that speculates; otherwise schedule the next step before reading it.
        if inflight is not None and rng.random() < 0.5:
            apply(*inflight)
            inflight = None
        # Drafts for any request, ready or not: the scheduler must use them only where it may.
        for r in list(sched.running) + list(sched.waiting):
            if rng.random() < 0.7:
                k = rng.randrange(1, 6)
                r.spec_tokens = _draft(rng, tracked[r.request_id].truth, r.num_tokens, k,
                                       rng.randrange(0, k + 1))
        step = sched.schedule()
        counts["preempted"] += len(step.preempted)
        if inflight is not None:  # a verifying request never runs again before its result
            verifying = {id(c.request) for c in inflight[0].chunks if c.draft}
            assert not any(id(c.request) in verifying for c in step.chunks)
        rows = device.run(step)
        if rng.random() < 0.04 and sched.requests:
            in_flight = [c.request for s in (step, inflight and inflight[0]) if s for c in s.chunks
                         if c.sample and not c.request.finished]
            victim = (rng.choice(in_flight) if in_flight and rng.random() < 0.7
                      else rng.choice(list(sched.requests.values())))
            counts["aborted_in_flight"] += any(r is victim for r in in_flight)
            counts["aborted_verify_in_flight"] += any(
                c.request is victim and c.draft for s in (step, inflight and inflight[0]) if s
                for c in s.chunks)
            assert sched.abort(victim.request_id) is victim
        if overlap:
            if inflight is not None:
                apply(*inflight)
            inflight = (step, rows) if step.chunks else None
        elif step.chunks:
            apply(step, rows)
        if added == 200 and not sched.has_work() and inflight is None:
            break
    else:
        pytest.fail(f"no progress: {len(sched.running)} running, {len(sched.waiting)} waiting")

    for t in tracked.values():
        r = t.request
        assert r.finished, r.request_id
        if r.finish_reason is FinishReason.ABORT:
            assert r.output_ids == t.expected[:len(r.output_ids)], r.request_id
            continue
        assert r.output_ids == t.expected, r.request_id
        last = r.output_ids[-1]
        stop = (last == EOS and not r.params.ignore_eos) or last in r.params.stop_token_ids
        assert r.finish_reason is (FinishReason.STOP if stop else FinishReason.LENGTH), r.request_id
        assert r.pages == [] and r.token_slot == -1

    # Nothing leaked: every page is free or a cached page nobody references.
    alloc = sched.allocator
    alloc.check_invariants()
    st = alloc.stats()
    assert st["num_used_pages"] == 0
    assert len(alloc._free) + st["num_evictable_pages"] == cfg.num_pages == st["num_free_pages"]
    assert sorted(sched._free_slots) == list(range(cfg.max_num_seqs))
    assert not sched.requests and not sched.running and not sched.waiting
    # The soak exercised what it is for.
    assert counts["accepted"] > 200 and counts["rejected_runs"] > 100, counts
    assert counts["preempted"] > 10 and counts["aborted_verify_in_flight"] >= 2, counts
    assert counts["emitted_short"] > 0, counts
    finished = [t.request.finish_reason for t in tracked.values()]
    assert {FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT} <= set(finished)
    if prefix_caching:
        assert st["hit_tokens"] > 200, st
