"""Data-parallel replicas behind ``ReplicaRouter``, in process and through ``arctic-jax serve``.

In process: two tiny random-weight engines with the same weights on two CPU
devices. Greedy outputs through the router equal each request run alone on one
engine; concurrent load reaches both replicas; a prompt whose prefix one replica
has cached goes there unless that replica is too busy; queue limits, duplicate
ids and early exits behave as on one ``AsyncEngine`` (and a reused id never sees
an aborted request's late tokens); the merged metrics carry a ``replica`` label; a
failed replica is routed around. Served: ``--data-parallel-size 2`` answers through the
official ``openai`` client exactly as one replica would.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from arctic_jax.bench import runner
from arctic_jax.engine.async_engine import AsyncEngine, QueueFullError
from arctic_jax.engine.replicas import ReplicaRouter, build_replicas, merged_metrics
from arctic_jax.sampling import SamplingParams
from arctic_jax.serving.cli_commands import ServerProcess
from helpers import server_env

KWARGS = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, page_size=8,
              token_buckets=(8, 32), page_buckets=(16,))
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines():
    engines, _ = build_replicas(lambda kw: runner.build_random_engine("tiny", kw, seed=5), KWARGS, 2)
    for e in engines:
        runner.warmup_engine(e, progress=False)
    return engines


def _router(engines, **kwargs) -> ReplicaRouter:
    router = ReplicaRouter([AsyncEngine(e) for e in engines], **kwargs)
    router.start()
    return router


async def _collect(front, prompt, params, rid, stop_after=None):
    tokens = []
    async for out in front.generate(prompt, params, rid):
        tokens += out.new_token_ids
        if stop_after is not None and len(tokens) >= stop_after:
            break
    return tokens


def _alone(engine, prompt, params=GREEDY):
    one = AsyncEngine(engine)
    one.start()
    try:
        return asyncio.run(_collect(one, prompt, params, "alone"))
    finally:
        one.shutdown()


def _prompts(rng, n, lo=3, hi=40):
    return [[int(t) for t in rng.integers(1, 100, int(rng.integers(lo, hi)))] for _ in range(n)]


def test_outputs_equal_a_single_engine_and_load_reaches_both(engines):
    rng = np.random.default_rng()
    prompts = _prompts(rng, 12)
    expected = [_alone(engines[0], p) for p in prompts]
    router = _router(engines, prefix_affinity_slack=0)   # balance only: replica 0 cached them all
    try:
        async def run():
            return await asyncio.gather(*(_collect(router, p, GREEDY, f"r{i}")
                                          for i, p in enumerate(prompts)))
        got = asyncio.run(run())
    finally:
        router.shutdown()
    assert got == expected
    assert router.routed == [6, 6]      # all 12 are routed before any finishes: alternating
    assert router.num_requests() == 0
    for e in engines:
        assert e.scheduler.allocator.usage() == 0                                     # all freed


def test_shared_prefix_goes_to_the_replica_that_cached_it(engines):
    rng = np.random.default_rng()
    system = [int(t) for t in rng.integers(1, 100, 40)]        # 5 full pages of 8
    long_params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for slack, expect_cached in ((4, True), (0, False)):
        router = _router(engines, prefix_affinity_slack=slack)
        try:
            async def run(router):
                # 1) the system prompt is computed (and cached) on replica 0 (a tie goes low)
                await _collect(router, system + [7, 8], GREEDY, "warm")
                # 2) a long request makes replica 0 the busier one
                busy = asyncio.ensure_future(_collect(router, [3, 1, 4, 1, 5], long_params, "busy"))
                while router.num_requests() == 0:
                    await asyncio.sleep(0.001)
                before = list(router.routed)
                # 3) a new question under the same system prompt
                cached = []
                async for out in router.generate(system + [9, 9, 2], GREEDY, "ask"):
                    cached.append(out.num_cached_tokens)
                await busy
                return before, cached[-1]
            before, cached_tokens = asyncio.run(run(router))
        finally:
            router.shutdown()
        assert before == [2, 0]
        went_to = 0 if router.routed[0] == 3 else 1
        assert went_to == (0 if expect_cached else 1), (slack, router.routed)
        assert (cached_tokens >= 40) == expect_cached, cached_tokens


def test_queue_limit_duplicate_ids_and_early_exit(engines):
    router = _router(engines, max_queue=2)
    long_params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    try:
        async def run():
            a = router.generate([1, 2, 3], long_params, "a")
            first = [await a.__anext__()]
            with pytest.raises(ValueError, match="duplicate request id"):
                await router.generate([1], GREEDY, "a").__anext__()
            with pytest.raises(ValueError, match="out of range"):       # checked before routing
                await router.generate([10**6], GREEDY, "bad").__anext__()
            b = router.generate([4, 5, 6], long_params, "b")
            first.append(await b.__anext__())
            with pytest.raises(QueueFullError):
                await router.generate([1], GREEDY, "c").__anext__()
            assert sum(router.routed) == 2
            await a.aclose()                      # leaving early aborts on its replica at once
            await b.aclose()
            assert router.num_requests() == 0
            assert all(r.num_requests() == 0 for r in router.replicas)
            # the same ids may be used again straight away
            again = [await _collect(router, [1, 2, 3], GREEDY, "a"),
                     await _collect(router, [4, 5, 6], GREEDY, "b")]
            return first, again
        first, again = asyncio.run(run())
        assert all(len(o.new_token_ids) >= 1 for o in first)
        assert [len(t) for t in again] == [6, 6]
        for e in engines:                          # aborted requests gave their pages back
            for _ in range(200):                   # (the abort is applied on the engine thread)
                if e.scheduler.allocator.usage() == 0:
                    break
                time.sleep(0.01)
            assert e.scheduler.allocator.usage() == 0
    finally:
        router.shutdown()


def test_reused_id_after_an_abort_gets_only_its_own_tokens(engines):
    """A late output of an aborted request must not reach a new request with its id."""
    prompt = [int(t) for t in np.random.default_rng().integers(1, 100, 12)]
    expected = _alone(engines[0], prompt)
    one = AsyncEngine(engines[0])
    one.start()
    long_params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    try:
        async def run():
            got = []
            for _ in range(6):
                old = one.generate([9, 8, 7, 6], long_params, "x")
                await old.__anext__()
                await old.aclose()
                got.append(await _collect(one, prompt, GREEDY, "x"))
            return got
        assert asyncio.run(run()) == [expected] * 6
    finally:
        one.shutdown()


def test_merged_metrics_label_each_replica(engines):
    router = _router(engines, prefix_affinity_slack=0)
    try:
        async def run():
            await asyncio.gather(*(_collect(router, [5, 6, 7, i], GREEDY, f"m{i}")
                                   for i in range(4)))
        asyncio.run(run())
    finally:
        router.shutdown()
    text = merged_metrics([e.metrics.registry for e in engines]).decode()
    assert text == router.render_metrics().decode()
    series = [line.split(" ")[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(series) == len(set(series)), "a series appears twice"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("arctic_generation_tokens", "arctic_num_requests_running",
                 "arctic_time_to_first_token_seconds"):
        replicas = {s.labels.get("replica") for s in families[name].samples}
        assert replicas == {"0", "1"}, (name, replicas)
    generated = {s.labels["replica"]: s.value for s in families["arctic_generation_tokens"].samples
                 if s.name == "arctic_generation_tokens_total"}
    for i, e in enumerate(engines):
        own = {s.name: s.value for f in text_string_to_metric_families(e.metrics.render().decode())
               for s in f.samples}
        assert generated[str(i)] == own["arctic_generation_tokens_total"] > 0
    with pytest.raises(ValueError, match="already has a 'reason' label"):
        merged_metrics([e.metrics.registry for e in engines], label="reason")


def test_router_rejects_bad_settings(engines):
    with pytest.raises(ValueError, match="at least one replica"):
        ReplicaRouter([])
    with pytest.raises(ValueError, match="prefix_affinity_slack"):
        ReplicaRouter([AsyncEngine(engines[0])], prefix_affinity_slack=-1)
    with pytest.raises(ValueError, match="need 3 devices|one-device"):
        build_replicas(lambda kw: runner.build_random_engine("tiny", kw),
                       dict(KWARGS, tensor_parallel_size=2), 2)


class _FailingReplica:
    """A replica whose engine fails on its first request, after streaming ``streamed``
    outputs (``engine`` is a real one, for the router's prompt checks and prefix lookups)."""

    def __init__(self, engine, streamed=0):
        self.engine, self.streamed = engine, streamed
        self.alive, self.error = True, None

    def start(self):
        pass

    def shutdown(self):
        pass

    def abort(self, request_id):
        pass

    def limits(self):
        return self.engine.limits()

    def validate_prompt(self, prompt_ids):
        self.engine.validate_prompt(prompt_ids)

    def cached_prefix_tokens(self, prompt_ids):
        return self.engine.scheduler.allocator.cached_prefix_tokens(prompt_ids)

    async def generate(self, prompt_ids, params, request_id):
        if not self.alive:
            raise RuntimeError("the engine is not running")
        for _ in range(self.streamed):
            yield SimpleNamespace(new_token_ids=[7], finished=False)
        self.alive, self.error = False, RuntimeError("boom")
        raise RuntimeError("engine failure: boom")


def test_a_failed_replica_is_routed_around(engines):
    """A replica that fails before streaming hands its request to another; later requests
    skip it; the server reports "degraded" while a replica still runs."""
    from fastapi.testclient import TestClient

    from arctic_jax.serving.app import ServerState, create_app

    prompt = [int(t) for t in np.random.default_rng(4).integers(1, 100, 12)]
    want = _alone(engines[1], prompt)   # same weights; caches the prompt on the failing side
    router = ReplicaRouter([_FailingReplica(engines[1]), AsyncEngine(engines[0])])
    router.start()
    try:
        assert asyncio.run(_collect(router, prompt, GREEDY, "a")) == want
        assert router.alive and router.failed_replicas == [0] and router.routed == [1, 1]
        assert asyncio.run(_collect(router, prompt, GREEDY, "b")) == want
        assert router.routed == [1, 2]
        state = ServerState(served_model_name="m")
        state.engine = router
        health = TestClient(create_app(state)).get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "degraded", "failed_replicas": [0], "error": "boom"}
    finally:
        router.shutdown()

    late = ReplicaRouter([_FailingReplica(engines[1], streamed=1), AsyncEngine(engines[0])])
    late.start()
    try:   # tokens already streamed cannot be taken back: the client gets the failure
        with pytest.raises(RuntimeError, match="engine failure: boom"):
            asyncio.run(_collect(late, prompt, GREEDY, "c"))
        assert late.routed == [1, 0] and late.num_requests() == 0
    finally:
        late.shutdown()

    alone = ReplicaRouter([_FailingReplica(engines[1])])
    with pytest.raises(RuntimeError, match="every replica failed"):
        asyncio.run(_collect(alone, prompt, GREEDY, "d"))
    assert not alone.alive
    with pytest.raises(RuntimeError, match="the engine is not running"):
        asyncio.run(_collect(alone, prompt, GREEDY, "e"))


# ------------------------------------------------------------------ served
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_with_two_replicas_answers_like_one():
    args = ["--model", "default", "--served-model-name", "m", "--max-num-seqs", "4",
            "--max-num-batched-tokens", "64", "--max-model-len", "192", "--page-size", "16",
            "--token-buckets", "8,64", "--page-buckets", "16", "--data-parallel-size", "2"]
    rng = random.Random()
    words = "amber bridge cedar delta ember fjord garnet harbor island juniper".split()
    # under one 16-token page, so no prefix affinity: routing follows load alone
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for _ in range(8)]
    with ServerProcess(args, env=server_env(devices=2), cwd=REPO_ROOT) as server:
        server.wait_ready(timeout=600)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        alone = [client.completions.create(model="m", prompt=p, max_tokens=8, temperature=0)
                 .choices[0].text for p in prompts]

        async def together():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x",
                                          max_retries=0, timeout=120) as c:
                rs = await asyncio.gather(*(c.completions.create(
                    model="m", prompt=p, max_tokens=8, temperature=0) for p in prompts * 2))
                return [r.choices[0].text for r in rs]
        assert asyncio.run(together()) == alone * 2
        text = httpx.get(server.url + "/metrics", timeout=10).text
        finished = {s.labels["replica"]: s.value
                    for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "arctic_requests_finished_total"}
        assert set(finished) == {"0", "1"} and sum(finished.values()) == 24, finished
        assert "2 data-parallel replicas" in server.log_tail()
