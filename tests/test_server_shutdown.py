"""Graceful shutdown of a live ``arctic-jax serve`` (the embedded SmolLM2), as vLLM and TGI do.

Two servers, one after the other: a patient one (``--shutdown-timeout 120``) and a hasty one
(``--shutdown-timeout 1``). On SIGINT the patient one answers /health and new requests with
503 (``Retry-After``, an OpenAI error body) while its running stream finishes unchanged (equal
to the same request run alone), then exits 0. On SIGTERM the hasty one ends its running stream
with an SSE error event after a second, answers its running non-streaming request with a 503
error body, and exits 0.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from arctic_jax.serving.cli_commands import ServerProcess
from helpers import server_env, tiny_server_args

MODEL = "smollm2-test"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_ARGS = tiny_server_args(MODEL)
STORY = {"model": MODEL, "prompt": "Write a long story about a lighthouse.", "temperature": 0,
         "ignore_eos": True}


def serve(timeout: str):
    proc = ServerProcess([*SERVER_ARGS, "--shutdown-timeout", timeout], env=server_env(),
                         cwd=REPO_ROOT)
    try:
        proc.wait_ready(timeout=300)
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def patient():
    yield from serve("120")


@pytest.fixture
def hasty():
    yield from serve("1")


class Stream(threading.Thread):
    """POST a streaming completion; collects the events' JSON objects (and "[DONE]")."""

    def __init__(self, server: ServerProcess, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = server.url + "/v1/completions", {**body, "stream": True}
        self.events: list = []
        self.first = threading.Event()
        self.status = None

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.body, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    if data != "[DONE]" and self.text():
                        self.first.set()
        self.first.set()

    def text(self) -> str:
        return "".join(e["choices"][0]["text"] for e in self.events
                       if isinstance(e, dict) and e.get("choices"))


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def assert_shutting_down_error(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 1
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "shutting_down"), error


def test_sigint_drains_running_requests_and_exits_0(patient):
    body = {**STORY, "max_tokens": 96}   # long enough to outlast the checks on a busy machine
    alone = httpx.post(patient.url + "/v1/completions", json=body, timeout=120)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["text"]

    stream = Stream(patient, body)
    stream.start()
    assert stream.first.wait(60) and stream.status == 200
    patient.proc.send_signal(signal.SIGINT)
    wait_for(lambda: patient.health()[0] == 503, 30, "/health to turn 503")
    assert patient.health() == (503, {"status": "shutting_down"})
    assert stream.is_alive(), "the stream ended before the checks: make it longer"
    assert_shutting_down_error(httpx.post(patient.url + "/v1/completions",
                                          json={**STORY, "max_tokens": 2}, timeout=30))
    assert_shutting_down_error(httpx.get(patient.url + "/v1/models", timeout=30))
    assert httpx.get(patient.url + "/metrics", timeout=30).status_code == 200
    stream.join(timeout=120)
    assert not stream.is_alive()
    assert stream.events[-1] == "[DONE]"
    assert stream.events[-2]["choices"][0]["finish_reason"] == "length"
    assert stream.text() == expected                     # finished, unchanged
    assert patient.proc.wait(timeout=30) == 0
    log = patient.log_tail(20_000)
    assert "shutting down: 1 request(s) in flight get up to 120 s" in log, log


def test_sigterm_after_the_timeout_aborts_with_an_error_and_exits_0(hasty):
    body = {**STORY, "max_tokens": 200}                  # far longer than the 1 s timeout
    stream = Stream(hasty, body)
    stream.start()
    result: dict = {}
    plain = threading.Thread(target=lambda: result.update(r=httpx.post(
        hasty.url + "/v1/completions", json=body, timeout=120)), daemon=True)
    plain.start()
    assert stream.first.wait(60) and stream.status == 200

    def running() -> float:
        text = httpx.get(hasty.url + "/metrics", timeout=10).text
        line = next(x for x in text.splitlines() if x.startswith("arctic_num_requests_running "))
        return float(line.split()[1])

    wait_for(lambda: running() == 2, 30, "both requests to run")
    start = time.monotonic()
    hasty.proc.send_signal(signal.SIGTERM)
    stream.join(timeout=60)
    plain.join(timeout=60)
    ended = time.monotonic() - start
    assert not stream.is_alive() and not plain.is_alive()
    assert 1 <= ended < 10, ended
    assert stream.events[-1] == "[DONE]"
    error = stream.events[-2]["error"]
    assert (error["type"], error["code"]) == ("server_error", "shutting_down"), error
    assert "--shutdown-timeout" in error["message"]
    assert stream.text() and len(stream.events) < body["max_tokens"]
    assert_shutting_down_error(result["r"])
    assert hasty.proc.wait(timeout=30) == 0
    assert "aborted the requests still in flight" in hasty.log_tail(20_000)
