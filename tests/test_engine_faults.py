"""A failing model step fails only its own requests; the engine and the server keep serving.

Faults are injected into one step of a tiny random model's engine (see ``FAULTS``): before its
launch, after its program consumed the donated KV cache, at the read of its result (with the
device state intact, or lost as after a device fault), and in its host post-processing. Each
time exactly the step's live requests fail; every other request, and a later one with the
same prompt as a failed one, gives the fault-free run's greedy tokens; all pages come back.
The server test sends a request that hits a fault: it gets a 500 OpenAI error while a
concurrent request and a later one succeed, and /health stays 200.
"""
from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.engine.step_failure import RequestFailed, StepFailed
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingParams
from helpers import TINY_ENGINE_CFG, CharTokenizer

CFG = TINY_ENGINE_CFG


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module")
def engine():
    weights = random_weights(CFG, jax.random.PRNGKey(11), scale=0.3)
    return LLMEngine(LLAMA, CFG, weights, CharTokenizer(), EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, page_size=4, num_pages=80,
        token_buckets=(32,), page_buckets=(24,)))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def workload(seed: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """Requests added together, in this order. With a 32-token budget and 4 sequences, step 1
    holds E, A and part of B; step 2 holds A's decode, the rest of B and T's prompt (E's one
    token is done, so E is not in it); W waits for a sequence slot until E finishes."""
    rng = np.random.default_rng(seed)

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(0, CFG.vocab_size, n)]

    return {"E": (prompt(5), greedy(1)), "A": (prompt(10), greedy(10)),
            "B": (prompt(30), greedy(8)), "T": (prompt(18), greedy(6)),
            "W": (prompt(12), greedy(7))}


class Run:
    """Drives the engine until idle, keeping each request's tokens, its finish and every
    ``StepFailed``."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}
        self.failures: list[StepFailed] = []

    def add(self, requests: dict[str, tuple[list[int], SamplingParams]]) -> Run:
        for rid, (prompt, params) in requests.items():
            self.engine.add_request(prompt, params, request_id=rid)
            self.tokens[rid] = []
        return self

    def drive(self) -> Run:
        for _ in range(1000):
            if not self.engine.has_unfinished():
                return self
            try:
                outputs = self.engine.step()
            except StepFailed as failure:
                self.failures.append(failure)
                outputs = failure.outputs
            for out in outputs:
                assert out.request_id not in self.finished, out
                self.tokens[out.request_id].extend(out.new_token_ids)
                if out.finished:
                    self.finished[out.request_id] = out.finish_reason.value
        raise AssertionError("the engine did not become idle")


def cached_first(seed: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """A request run before the workload: its prompt's pages stay in the prefix cache."""
    rng = np.random.default_rng(seed)
    return {"P": ([int(t) for t in rng.integers(0, CFG.vocab_size, 13)], greedy(5))}


@pytest.fixture(scope="module")
def reference(engine):
    """The fault-free run's tokens of ``cached_first(6)`` then ``workload(5)``."""
    run = Run(engine).add(cached_first(6)).drive().add(workload(5)).drive()
    assert not run.failures and set(run.finished.values()) == {"length"}
    return run.tokens


class Injector:
    """Raises ``InjectedFault`` once, where ``kind`` says, in a step chosen by whether it holds
    request ``target``; records the live requests of that step (the ones that must fail)."""

    def __init__(self, engine: LLMEngine, monkeypatch, kind: str, target: str = "T"):
        self.engine, self.kind, self.target = engine, kind, target
        self.launched: list = []         # [(step, packed)]
        self.fired: list[set[str]] = []  # the live requests of the faulted step, when it fired
        self.armed: set[str] | None = None   # set while the donating fault's step launches
        self.reading: set[str] = set()       # the live requests of the step being read
        runner = engine.runner
        self._dispatch, self._fetch, self._read = runner.dispatch, runner.fetch, engine._read_step
        monkeypatch.setattr(runner, "dispatch", self.dispatch)
        monkeypatch.setattr(runner, "fetch", self.fetch)
        monkeypatch.setattr(engine, "_read_step", self.read_step)
        if kind == "donated":
            for key, program in list(runner._programs.items()):
                monkeypatch.setitem(runner._programs, key, self._donating(program))

    @staticmethod
    def live(step) -> set[str]:
        return {c.request.request_id for c in step.chunks if not c.request.finished}

    def _fire(self, live: set[str]) -> None:
        self.fired.append(live)
        raise InjectedFault(f"injected {self.kind} fault")

    def dispatch(self, step, draft=False):
        ids = self.live(step)
        if not self.fired and self.target in ids and self.kind in ("dispatch", "donated"):
            if self.kind == "dispatch":
                self._fire(ids)
            self.armed = ids   # the model program fails after consuming the cache
            try:
                return self._dispatch(step, draft)
            finally:
                self.armed = None
        packed, variant = self._dispatch(step, draft)
        self.launched.append((step, packed))
        return packed, variant

    def _donating(self, program):
        def run(weights, cache, *args):
            if self.armed is None:
                return program(weights, cache, *args)
            program(weights, cache, *args)
            assert all(a.is_deleted() for a in jax.tree.leaves(cache)), "the cache was not donated"
            self._fire(self.armed)
        return run

    def fetch(self, packed, *args, **kwargs):
        index = next(i for i, (_, p) in enumerate(self.launched) if p is packed)
        step = self.launched[index][0]
        after = self.launched[index + 1][0] if index + 1 < len(self.launched) else None
        if (not self.fired and self.kind in ("fetch", "poisoned") and after is not None
                and self.target in self.live(after) and self.target not in self.live(step)):
            if self.kind == "poisoned":   # as after a device fault: nothing launched since survives
                for leaf in jax.tree.leaves(self.engine.runner.cache):
                    leaf.delete()
                self.launched[index + 1][1].delete()
            self._fire(self.reading)
        return self._fetch(packed, *args, **kwargs)

    def read_step(self, step, *args):
        self.reading = self.live(step)
        return self._read(step, *args)

    def fail_detokenizer(self) -> None:
        """The target's detokenizer raises on its first token (host post-processing)."""
        detok = self.engine._detok[self.target]

        def add(ids):
            self._fire(set(self.reading))

        detok.add = add


FAULTS = {   # name -> (where, target, the requests that fail, whether the device state was lost)
    "dispatch": ("dispatch", "T", {"A", "B", "T"}, False),   # T's first step fails before its launch
    "donated": ("donated", "T", {"A", "B", "T"}, True),      # ... after its program took the cache
    "fetch": ("fetch", "T", {"E", "A", "B"}, False),         # the step before T's fails at its read
    "poisoned": ("poisoned", "T", {"E", "A", "B"}, True),    # ... and took the device state with it
    "detokenize": ("detokenize", "T", {"A", "B", "T"}, False),   # T's first token
    # E's only token: E finished in the failed step, but its final output was never returned
    "detokenize_finished": ("detokenize", "E", {"E", "A", "B"}, False),
}


@pytest.fixture
def idle_engine(engine):
    """The module's engine, left idle after the test even when it fails."""
    yield engine
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    try:
        Run(engine).drive()
    except (AssertionError, StepFailed):
        pass


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_failing_step_fails_only_its_requests(idle_engine, reference, monkeypatch, name):
    kind, target, want_failed, want_lost = FAULTS[name]
    engine = idle_engine
    alloc = engine.scheduler.allocator
    alloc.forget_cached_pages()   # the faulted run computes its prompts as the reference did
    assert Run(engine).add(cached_first(6)).drive().tokens == {"P": reference["P"]}
    assert alloc.stats()["num_cached_pages"] == 4   # 17 of its 18 tokens computed
    failures_before = engine.metrics.step_failures._value.get()
    injector = Injector(engine, monkeypatch, kind, target)
    run = Run(engine).add(workload(5))
    if kind == "detokenize":
        injector.fail_detokenizer()
    run.drive()

    assert len(injector.fired) == 1, "the fault did not fire once"
    assert injector.fired[0] == want_failed
    (failure,) = run.failures
    assert set(failure.request_ids) == want_failed
    assert isinstance(failure.cause, InjectedFault) and failure.device_state_lost == want_lost
    assert "InjectedFault: injected" in str(failure.request_error())
    assert engine.metrics.step_failures._value.get() == failures_before + 1
    for rid, tokens in run.tokens.items():
        if rid in want_failed:   # what streamed before the failure was right; no final output
            assert rid not in run.finished and tokens == reference[rid][:len(tokens)]
        else:
            assert run.finished[rid] == "length" and tokens == reference[rid], rid
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert alloc.stats()["num_used_pages"] == 0
    alloc.check_invariants()

    # Later requests, with the prompts of a failed and a surviving one and of the cached one,
    # run as without the fault (after a lost device state, the prefix cache must not offer the
    # old pages: their KV is gone).
    work = workload(5)
    later = Run(engine).add({"A2": work["A"], "W2": work["W"], "P2": cached_first(6)["P"]})
    assert engine.scheduler.allocator.cached_prefix_tokens(cached_first(6)["P"][0]) == (
        0 if want_lost else 12)
    later.drive()
    assert not later.failures
    assert later.tokens == {"A2": reference["A"], "W2": reference["W"], "P2": reference["P"]}
    assert alloc.stats()["num_used_pages"] == 0
    alloc.check_invariants()


def test_a_step_that_is_not_contained_still_stops_the_async_engine(idle_engine, monkeypatch):
    """An exception outside a step (here the scheduler's) is not a step failure: the engine
    thread stops and every client gets the error, as before."""
    import asyncio

    from arctic_jax.engine.async_engine import AsyncEngine

    engine = idle_engine
    front = AsyncEngine(engine)

    def broken():
        raise InjectedFault("scheduler bug")

    monkeypatch.setattr(engine.scheduler, "schedule", broken)
    front.start()
    try:
        async def one():
            async for _ in front.generate([5, 6, 7], greedy(3), "x"):
                pass

        with pytest.raises(RuntimeError, match="engine failure: scheduler bug"):
            asyncio.run(one())
        assert not front.alive and isinstance(front.error, InjectedFault)
    finally:
        front.shutdown()


def test_server_answers_500_for_the_failed_step_and_keeps_serving(idle_engine, monkeypatch):
    from fastapi.testclient import TestClient

    from arctic_jax.engine.async_engine import AsyncEngine
    from arctic_jax.serving.app import ServerState, create_app

    engine = idle_engine
    rng = np.random.default_rng(21)
    bad_prompt = [int(t) for t in rng.integers(0, CFG.vocab_size, 14)]
    good_prompt = [int(t) for t in rng.integers(0, CFG.vocab_size, 9)]
    want = Run(engine).add({"ref": (good_prompt, greedy(8))}).drive().tokens["ref"]
    want_text = CharTokenizer().decode(want)

    failures_before = engine.metrics.step_failures._value.get()
    in_step, release = threading.Event(), threading.Event()
    real_dispatch = engine.runner.dispatch

    def dispatch(step, draft=False):
        if any(c.request.prompt_ids == bad_prompt for c in step.chunks):
            in_step.set()
            assert release.wait(30)
            raise InjectedFault("device said no")
        return real_dispatch(step, draft)

    monkeypatch.setattr(engine.runner, "dispatch", dispatch)
    front = AsyncEngine(engine)
    state = ServerState()
    state.set_ready(front, tokenizer=None, model_name="m")
    client = TestClient(create_app(state))
    front.start()
    try:
        def post(prompt, **kw):
            return client.post("/v1/completions", json={"model": "m", "prompt": prompt,
                                                        "max_tokens": 8, "temperature": 0, **kw})

        results = {}
        bad = threading.Thread(target=lambda: results.update(bad=post(bad_prompt)))
        bad.start()
        assert in_step.wait(60)
        # a request that arrives while the failing step runs is not part of it
        good = threading.Thread(target=lambda: results.update(good=post(good_prompt)))
        good.start()
        deadline = time.monotonic() + 30
        while front.num_requests() < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        release.set()
        bad.join(60)
        good.join(60)

        r = results["bad"]
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "server_error" and error["code"] == "step_failed"
        assert error["param"] is None
        assert "InjectedFault: device said no" in error["message"], error
        assert results["good"].status_code == 200, results["good"].text
        assert results["good"].json()["choices"][0]["text"] == want_text

        streamed = post(bad_prompt, stream=True)   # fails again before any event: a plain 500
        assert streamed.status_code == 500 and streamed.json()["error"]["code"] == "step_failed"
        later = post(good_prompt)
        assert later.status_code == 200 and later.json()["choices"][0]["text"] == want_text
        health = client.get("/health")
        assert health.status_code == 200, health.text
        metrics = client.get("/metrics").text
        assert f"arctic_engine_step_failures_total {failures_before + 2}" in metrics
        assert front.alive and front.num_requests() == 0
    finally:
        release.set()
        front.shutdown()
    assert engine.scheduler.allocator.stats()["num_used_pages"] == 0


def test_request_failed_maps_to_a_server_error():
    from arctic_jax.serving.errors import engine_error

    failure = StepFailed(["a", "b"], InjectedFault("boom"))
    err = engine_error(failure.request_error())
    assert isinstance(failure.request_error(), RequestFailed)
    assert (err.status, err.type, err.code) == (500, "server_error", "step_failed")
    assert "InjectedFault: boom" in err.message and "'a'" not in err.message


def test_forget_cached_pages_frees_the_evictable_pages():
    from arctic_jax.engine.page_allocator import PageAllocator

    rng = np.random.default_rng(3)
    tokens = [int(t) for t in rng.integers(0, 1000, 17)]
    alloc = PageAllocator(12, 4)
    held = alloc.allocate(5)
    alloc.register_full_pages(held, tokens)
    other = alloc.allocate(2)
    alloc.register_full_pages(other, tokens[:8])   # same content: stays a private duplicate
    alloc.free(held)
    assert alloc.cached_prefix_tokens(tokens) == 16 and alloc.stats()["num_evictable_pages"] == 4
    alloc.forget_cached_pages()
    alloc.check_invariants()
    assert alloc.cached_prefix_tokens(tokens) == 0 and alloc.match_prefix(tokens) == ([], 0)
    assert alloc.stats()["num_evictable_pages"] == 0 and alloc.num_free() == 10
    alloc.free(other)   # pages in use stay in use; freed later, they are plain free pages
    assert alloc.num_free() == 12
    alloc.check_invariants()
