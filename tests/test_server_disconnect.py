"""A client that disconnects during a long prefill has its request aborted at the next step
boundary and its KV pages freed, streaming or not; the time from the disconnect to the free is
measured (and written as JSON to $ARCTIC_JAX_DISCONNECT_SUMMARY when set).

The server takes 16 tokens a step, so a 200-token prompt needs 13 steps; the client sends the
request on a raw socket, waits until the engine runs it and has computed only part of the
prompt, and closes the socket. A non-streaming request and a streaming one both wait for their
first output in ``until_disconnected``, which polls the connection every
``DISCONNECT_POLL_S`` (0.2 s).
"""
from __future__ import annotations

import json
import os
import re
import socket
import time

import httpx
import numpy as np
import pytest

from arctic_jax.serving.generations import DISCONNECT_POLL_S
from helpers import running_server, tiny_server_args

MODEL = "smollm2-test"
STEP_TOKENS = 16
PROMPT_TOKENS = 200
REPEATS = 3
FREE_WITHIN_S = 3.0   # the poll interval, one step and the metrics poll fit many times over
SERVER_ARGS = tiny_server_args(MODEL, "--max-num-batched-tokens", str(STEP_TOKENS),
                               "--token-buckets", f"8,{STEP_TOKENS}")


@pytest.fixture(scope="module")
def server():
    yield from running_server(SERVER_ARGS)


def scrape(client: httpx.Client, url: str) -> dict[str, float]:
    """Running, waiting, KV usage, step tokens (all variants), generated tokens, aborted
    requests."""
    text = client.get(url + "/metrics").text

    def one(name: str) -> float:
        return float(re.search("^" + re.escape(name) + r" (\S+)$", text, re.MULTILINE).group(1))

    aborted = re.search(r'^arctic_requests_finished_total\{reason="abort"\} (\S+)$', text, re.MULTILINE)
    return {"running": one("arctic_num_requests_running"),
            "waiting": one("arctic_num_requests_waiting"),
            "kv_usage": one("arctic_kv_cache_usage_ratio"),
            "step_tokens": sum(float(v) for v in re.findall(
                r"^arctic_engine_step_tokens_total\{[^}]*\} (\S+)$", text, re.MULTILINE)),
            "generated": one("arctic_generation_tokens_total"),
            "aborted": float(aborted.group(1)) if aborted else 0.0}


def idle(m: dict[str, float]) -> bool:
    return m["running"] == 0 and m["waiting"] == 0 and m["kv_usage"] == 0


def wait_for(client, url, ready, timeout: float, poll: float = 0.005) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(client, url)
        if ready(m):
            return m
        assert time.monotonic() < deadline, f"metrics never became ready: {m}"
        time.sleep(poll)


def raw_post(server, body: dict) -> socket.socket:
    """Send a POST /v1/completions on a fresh socket and return it unread."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def disconnect_during_prefill(server, client, stream: bool, seed: int) -> dict[str, float]:
    """Close the connection while the prompt is part-computed; seconds until its pages are free."""
    base = wait_for(client, server.url, idle, 30)
    prompt = [int(t) for t in np.random.default_rng(seed).integers(1000, 20000, PROMPT_TOKENS)]
    sock = raw_post(server, {"model": MODEL, "prompt": prompt, "max_tokens": 40,
                             "temperature": 0, "ignore_eos": True, "stream": stream})
    try:
        at_close = wait_for(client, server.url, lambda m: m["running"] == 1, 30)
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
    closed = time.monotonic()
    freed = wait_for(client, server.url, idle, 30, poll=0.002)
    seconds = time.monotonic() - closed
    computed = at_close["step_tokens"] - base["step_tokens"]
    assert 0 <= computed < PROMPT_TOKENS, f"the prefill was over at the disconnect ({computed})"
    assert freed["aborted"] == base["aborted"] + 1
    assert freed["generated"] == base["generated"], "the request was aborted after its prefill"
    return {"disconnect_to_free_s": round(seconds, 4),
            "prompt_tokens_computed_at_disconnect": int(computed),
            "prompt_tokens_computed_at_free": int(freed["step_tokens"] - base["step_tokens"])}


def test_disconnect_during_prefill_frees_pages_quickly(server):
    with httpx.Client(timeout=30) as client:
        warm = [int(t) for t in np.random.default_rng(0).integers(1000, 20000, PROMPT_TOKENS)]
        r = client.post(server.url + "/v1/completions",   # first steps' one-time costs
                        json={"model": MODEL, "prompt": warm, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        runs = {mode: [disconnect_during_prefill(server, client, stream, seed=1 + 2 * i + stream)
                       for i in range(REPEATS)]
                for mode, stream in (("non_streaming", False), ("streaming", True))}
        results = {mode: {"disconnect_to_free_s": [r["disconnect_to_free_s"] for r in rs],
                          "max_s": max(r["disconnect_to_free_s"] for r in rs),
                          "prompt_tokens_computed_at_disconnect": [
                              r["prompt_tokens_computed_at_disconnect"] for r in rs],
                          "prompt_tokens_computed_at_free": [
                              r["prompt_tokens_computed_at_free"] for r in rs]}
                   for mode, rs in runs.items()}
        # the server goes on serving
        r = client.post(server.url + "/v1/completions",
                        json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
        assert idle(wait_for(client, server.url, idle, 30))
    summary = {"prompt_tokens": PROMPT_TOKENS, "step_tokens": STEP_TOKENS,
               "disconnect_poll_s": DISCONNECT_POLL_S, **results}
    print("disconnect during prefill:", json.dumps(summary))
    path = os.environ.get("ARCTIC_JAX_DISCONNECT_SUMMARY")
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    for mode, r in results.items():
        assert r["max_s"] < FREE_WITHIN_S, (mode, r)
        assert max(r["prompt_tokens_computed_at_free"]) < PROMPT_TOKENS, (mode, r)
