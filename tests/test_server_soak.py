"""A soak of the live server: 1,000 requests at concurrency 32 on a page pool so small that
requests are preempted, a third of them cancelled mid-stream, with ``n`` > 1 and the
penalties mixed in.

Checked: every request that was not cancelled completes with the output it gives alone
(greedy; each of its ``n`` choices too), no request is lost (each ends in a completion or in
the cancellation the client chose), the running, waiting and KV-usage gauges return to 0, and
the server's RSS grows by less than 5% over the run. With ``ARCTIC_JAX_SOAK_SUMMARY`` set, the
figures are written there as JSON (for the reliability table of ``benchmarks/RESULTS.md``).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time

import httpx
import psutil
import pytest

from helpers import running_server, tiny_server_args

MODEL = "smollm2-soak"
NUM_REQUESTS = 1000
CONCURRENCY = 32
NUM_SPECS = 24
WORDS = ("river stone cloud lantern market garden violin copper winter harbor meadow pencil "
         "orbit candle forest silver ladder window thunder pepper").split()
# 20 pages of 16 tokens for up to 8 running sequences of up to ~60 prompt tokens: the pool
# runs out, so the scheduler preempts (and later recomputes) the newest requests.
SERVER_ARGS = tiny_server_args(MODEL, "--num-pages", "20", "--max-queue", "256")


@pytest.fixture(scope="module")
def server():
    yield from running_server(SERVER_ARGS)


def make_specs(rng: random.Random) -> list[dict]:
    """Distinct greedy requests: chat or completion, some with n = 2 or 3, some penalised."""
    specs = []
    for i in range(NUM_SPECS):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
        body: dict = {"model": MODEL, "temperature": 0, "max_tokens": rng.randint(2, 8)}
        if i % 4 == 3:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        if i % 3 == 1:
            body["n"] = 2 + i % 2
        if i % 5 in (1, 2):
            body.update(presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3)
        specs.append(body)
    return specs


def route(body: dict) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def texts_of(resp: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"]
            for c in sorted(resp["choices"], key=lambda c: c["index"])]


async def complete(client: httpx.AsyncClient, body: dict) -> list[str]:
    r = await client.post(route(body), json=body)
    assert r.status_code == 200, r.text
    return texts_of(r.json())


async def cancel_midstream(client: httpx.AsyncClient, body: dict) -> None:
    """Stream ``body`` and hang up after the first event."""
    async with client.stream("POST", route(body), json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                return


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    names = ("arctic_num_requests_running", "arctic_num_requests_waiting",
             "arctic_kv_cache_usage_ratio", "arctic_num_preemptions_total")
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            values[name] = float(value)
    return values


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(url)
        busy = [g["arctic_num_requests_running"], g["arctic_num_requests_waiting"],
                g["arctic_kv_cache_usage_ratio"]]
        if busy == [0, 0, 0]:
            return g
        assert time.monotonic() < deadline, f"still busy after {timeout} s: {busy}"
        time.sleep(0.1)


@pytest.mark.slow
def test_soak_1000_requests_with_cancellations_preemption_n_and_penalties(server):
    rng = random.Random(20261207)
    specs = make_specs(rng)
    process = psutil.Process(server.proc.pid)

    async def run() -> tuple[list, list, int]:
        limits = httpx.Limits(max_connections=CONCURRENCY + 4)
        async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:
            expected = [await complete(client, s) for s in specs]   # each alone
            # a warm-up round at full concurrency, so the baseline RSS includes the buffers
            # that concurrency needs
            await asyncio.gather(*(complete(client, specs[i % NUM_SPECS])
                                   for i in range(CONCURRENCY)))
            wait_idle(server.url)
            rss_before = process.memory_info().rss
            plan = [(rng.randrange(NUM_SPECS), k % 3 == 0) for k in range(NUM_REQUESTS)]
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(spec: int, cancel: bool):
                async with gate:
                    if cancel:
                        await cancel_midstream(client, specs[spec])
                        return None
                    return await complete(client, specs[spec])

            results = await asyncio.gather(*(one(s, c) for s, c in plan), return_exceptions=True)
            return expected, list(zip(plan, results, strict=True)), rss_before

    start = time.monotonic()
    expected, outcomes, rss_before = asyncio.run(run())
    elapsed = time.monotonic() - start
    errors = [(plan, r) for plan, r in outcomes if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    wrong = [(spec, got, expected[spec]) for (spec, cancel), got in outcomes
             if not cancel and got != expected[spec]]
    assert not wrong, wrong[:3]
    assert any(len(e) > 1 for e in expected)   # n > 1 was exercised (greedy copies agree)
    idle = wait_idle(server.url)
    assert idle["arctic_num_preemptions_total"] > 0   # the page pool was small enough
    rss_after = process.memory_info().rss
    growth = rss_after / rss_before - 1
    summary = {"requests": NUM_REQUESTS, "concurrency": CONCURRENCY,
               "cancelled": sum(c for (_, c), _ in outcomes),
               "completed": sum(not c for (_, c), _ in outcomes), "lost": len(errors),
               "wrong": len(wrong), "preemptions": idle["arctic_num_preemptions_total"],
               "leaked_kv_usage": idle["arctic_kv_cache_usage_ratio"],
               "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
               "seconds": round(elapsed, 1)}
    print(json.dumps(summary))
    if os.environ.get("ARCTIC_JAX_SOAK_SUMMARY"):
        with open(os.environ["ARCTIC_JAX_SOAK_SUMMARY"], "w") as f:
            json.dump(summary, f)
    assert growth < 0.05, summary
