"""Bad requests to the server get the right status and an OpenAI-style error body.

The server runs with ``--api-key`` (401 without it) and ``--max-queue 1`` (429
with Retry-After while one request is in flight). Every bad request is also
sent while a good request runs; that request's output must equal the same
request run alone, and the server must keep serving afterwards.
"""
from __future__ import annotations

import os
import re
import threading
import time

import httpx
import pytest

from helpers import running_server, tiny_server_args

MODEL = "smollm2-test"
API_KEY = "sk-test-7f3a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODEL_LEN = 256
SERVER_ARGS = tiny_server_args(MODEL, "--api-key", API_KEY, "--max-queue", "1")
GOOD = {"model": MODEL, "prompt": "Write a long story about a lighthouse.", "max_tokens": 64,
        "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    yield from running_server(SERVER_ARGS)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search("^" + re.escape(name) + r" (\S+)$", text, re.MULTILINE).group(1))


def completion(**changes):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    body.update(changes)
    return body


def chat(**changes):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    body.update(changes)
    return body


LONG_PROMPT = " ".join(["lantern"] * (MAX_MODEL_LEN + 20))

# name -> (path, JSON body or raw bytes, param named in the error, or "" for none)
BAD_REQUESTS = {
    "malformed_json": ("/v1/completions", b'{"model": "smollm2-test", "prompt": ', ""),
    "not_an_object": ("/v1/completions", b"[1, 2, 3]", ""),
    "temperature_wrong_type": ("/v1/completions", completion(temperature="hot"), "temperature"),
    "max_tokens_wrong_type": ("/v1/chat/completions", chat(max_tokens="4"), "max_tokens"),
    "stream_wrong_type": ("/v1/completions", completion(stream="yes"), "stream"),
    "messages_wrong_type": ("/v1/chat/completions", chat(messages="Hi"), "messages"),
    "unknown_role": ("/v1/chat/completions",
                     chat(messages=[{"role": "wizard", "content": "Hi"}]), "messages"),
    "empty_messages": ("/v1/chat/completions", chat(messages=[]), "messages"),
    "missing_prompt": ("/v1/completions", {"model": MODEL}, "prompt"),
    "unknown_field": ("/v1/completions", completion(best_temperature=1), "best_temperature"),
    "unknown_model": ("/v1/completions", completion(model="gpt-9"), "model"),
    "chat_unknown_model": ("/v1/chat/completions", chat(model="gpt-9"), "model"),
    "max_tokens_zero": ("/v1/completions", completion(max_tokens=0), "max_tokens"),
    "max_completion_tokens_negative": ("/v1/chat/completions", chat(max_completion_tokens=-3),
                                       "max_completion_tokens"),
    "negative_temperature": ("/v1/completions", completion(temperature=-0.5), "temperature"),
    "top_p_zero": ("/v1/chat/completions", chat(top_p=0), "top_p"),
    "negative_seed": ("/v1/completions", completion(seed=-1), "seed"),
    "empty_stop_string": ("/v1/completions", completion(stop=[""]), "stop"),
    "too_long_prompt": ("/v1/completions", completion(prompt=LONG_PROMPT), "prompt"),
    "too_long_chat": ("/v1/chat/completions",
                      chat(messages=[{"role": "user", "content": LONG_PROMPT}]), "messages"),
    "prompt_plus_max_tokens_too_long": ("/v1/completions",
                                        completion(prompt="Hello", max_tokens=MAX_MODEL_LEN),
                                        "max_tokens"),
    "token_id_out_of_range": ("/v1/completions", completion(prompt=[1, 2, 10**7]), "prompt"),
    "empty_prompt": ("/v1/completions", completion(prompt=""), "prompt"),
    "n_17": ("/v1/completions", completion(n=17), "n"),
    "chat_n_zero": ("/v1/chat/completions", chat(n=0), "n"),
    "echo": ("/v1/completions", completion(echo=True), "echo"),
    "logprobs_too_many": ("/v1/completions", completion(logprobs=50), "logprobs"),
    "top_logprobs_without_logprobs": ("/v1/chat/completions", chat(top_logprobs=2),
                                      "top_logprobs"),
    "presence_penalty_out_of_range": ("/v1/chat/completions", chat(presence_penalty=2.5),
                                      "presence_penalty"),
    "logit_bias_out_of_vocab": ("/v1/chat/completions", chat(logit_bias={"10000000": 1.0}),
                                "logit_bias"),
    "stream_options_without_stream": ("/v1/completions",
                                      completion(stream_options={"include_usage": True}),
                                      "stream_options"),
}


def post(server, path, body, headers=AUTH) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, timeout=30,
                          headers={**headers, "Content-Type": "application/json"})
    return httpx.post(server.url + path, json=body, timeout=30, headers=headers)


def assert_error(r: httpx.Response, status: int, param: str | None = None,
                 type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == type_, err
    if param is not None:
        assert err["param"] == (param or None), err
        if param and param not in ("messages", "prompt"):  # those messages speak of "the prompt"
            assert param in err["message"], err
    return err


def check_bad_request(server, name):
    path, body, param = BAD_REQUESTS[name]
    assert_error(post(server, path, body), 400, param)


def check_auth_errors(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key"},
                    {"Authorization": f"Basic {API_KEY}"}):
        err = assert_error(post(server, "/v1/completions", completion(), headers=headers), 401)
        assert err["code"] == "invalid_api_key"
        assert_error(httpx.get(server.url + "/v1/models", headers=headers), 401)


def check_queue_full(server) -> None:
    r = post(server, "/v1/completions", completion())
    err = assert_error(r, 429, type_="rate_limit_error")
    assert err["code"] == "queue_full"
    assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_gets_400(server, name):
    check_bad_request(server, name)


def test_auth_required_on_v1_only(server):
    check_auth_errors(server)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    r = httpx.get(server.url + "/v1/models", headers=AUTH)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(server.url + "/v1/completions", headers=AUTH), 405)


def test_bad_requests_beside_a_running_request(server):
    alone = post(server, "/v1/completions", GOOD)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["text"]
    assert alone.json()["usage"]["completion_tokens"] == GOOD["max_tokens"]

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(r=post(server, "/v1/completions", GOOD)))
    runner.start()
    deadline = time.monotonic() + 30
    while metric(server, "arctic_num_requests_running") != 1:
        assert runner.is_alive() and time.monotonic() < deadline, "the good request never ran"
        time.sleep(0.05)
    check_queue_full(server)          # the good request fills the queue (--max-queue 1)
    for name in sorted(BAD_REQUESTS):
        check_bad_request(server, name)  # validation errors win over a full queue
    check_auth_errors(server)
    if runner.is_alive():
        check_queue_full(server)
    runner.join(timeout=120)
    assert not runner.is_alive()
    r = result["r"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected

    after = post(server, "/v1/chat/completions", chat(temperature=0))
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"]
