"""The server's OpenAPI document is its contract, and the server keeps it.

In process (a fake ``EngineFront`` and a fake tokenizer behind the real app, no model): the
document declares every request body, response, error response (the OpenAI error body), the
bearer security scheme, text/plain /metrics and the served model's limits; and for several
hundred bodies (every request field set to each of a pool of values, plus hand-written
cases), a body is valid under the served document's JSON schema (``jsonschema``) exactly when
the server answers 200. The same for /v1/embeddings on the real all-MiniLM-L6-v2 engine.

Against a live ``arctic-jax serve`` of the embedded SmolLM2: the fixed messages of issue 17
(``"seed": 0.0`` is the integer 0, a lone surrogate, an empty prompt), the served document
agreeing with the live validator, and the request-size limit: a 20 MB body (declared, and
chunked) gets 413 at once, before it is tokenized, while a concurrent request completes
unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time

import httpx
import jsonschema
import pytest
from fastapi.testclient import TestClient

from arctic_jax.engine.front import EngineLimits
from arctic_jax.engine.request import FinishReason, RequestOutput
from arctic_jax.serving import schemas as schemas_module
from arctic_jax.serving.app import ServerState, create_app
from arctic_jax.serving.protocol import lone_surrogate
from arctic_jax.serving.schemas import MAX_STOP_SEQUENCES
from helpers import running_server, tiny_server_args

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = EngineLimits(vocab_size=100, max_model_len=64, max_logprobs=5, max_num_seqs=4)
ERROR_STATUSES = {"/v1/completions": {400, 401, 413, 429, 500, 503},
                  "/v1/chat/completions": {400, 401, 413, 429, 500, 503},
                  "/v1/embeddings": {400, 401, 413, 429, 500, 503},
                  "/v1/models": {401, 500, 503}}


# --------------------------------------------------------------------------- fakes
class FakeTokenizer:
    """One token per non-space character (so " " has no tokens); a chat template that wraps
    the messages' tokens in [2] ... [3]."""

    chat_template = "fake"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [4 + ord(c) % (LIMITS.vocab_size - 4) for c in text
                              if not c.isspace()]}

    def apply_chat_template(self, conversation, add_generation_prompt, tokenize):
        return [2, *(t for m in conversation for t in self(m["content"])["input_ids"]), 3]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(f"<{i}>" for i in ids)


@dataclasses.dataclass
class FakeFront:
    """An ``EngineFront`` that answers with the prompt's ids reversed."""

    limits_: EngineLimits
    error: BaseException | None = None
    alive: bool = True
    failed_replicas: list = dataclasses.field(default_factory=list)

    def limits(self):
        return self.limits_

    def validate_prompt(self, ids):
        if not 1 <= len(ids) < self.limits_.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens")

    async def generate(self, ids, params, request_id):
        out = (list(reversed(ids)) * params.max_tokens)[:params.max_tokens]
        for k, token in enumerate(out):
            last = k == len(out) - 1
            yield RequestOutput(request_id=request_id, new_token_ids=[token],
                                new_text=f"<{token}>", new_logprobs=[-0.5],
                                new_top_logprobs=[[(token, -0.5)]], finished=last,
                                finish_reason=FinishReason.LENGTH if last else None,
                                num_prompt_tokens=len(ids), num_output_tokens=k + 1,
                                num_cached_tokens=0)

    def abort(self, request_id):
        pass

    def num_requests(self):
        return 0

    def render_metrics(self):
        return b"fake_metric 1.0\n"

    def shutdown(self):
        pass


def fake_app(api_key: str | None = None, max_request_bytes: int = 1 << 20) -> tuple:
    state = ServerState(served_model_name="fake", api_key=api_key,
                        max_request_bytes=max_request_bytes)
    app = create_app(state)
    unready = app.openapi()          # before the model is ready: not cached
    state.set_ready(FakeFront(LIMITS), FakeTokenizer(), "fake", aliases=("default",))
    return TestClient(app), app, unready


@pytest.fixture(scope="module")
def fake():
    client, app, unready = fake_app()
    return client, app.openapi(), unready


def validator(doc: dict, name: str) -> jsonschema.Draft202012Validator:
    """A validator of the document's component ``name`` (references resolved in ``doc``)."""
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                            "components": doc["components"]})


def post(client, path: str, body) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def assert_error(r, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param and body["error"]["code"] == code, body
    return body["error"]


# ----------------------------------------------------------------------- the document
def test_document_declares_bodies_responses_errors_and_security(fake):
    _, doc, unready = fake
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for schema in schemas.values():
        jsonschema.Draft202012Validator.check_schema(schema)   # each is a valid JSON schema
    bodies = {"/v1/completions": "CompletionRequest", "/v1/chat/completions":
              "ChatCompletionRequest", "/v1/embeddings": "EmbeddingRequest"}
    # A generation model's server documents its routes only; before it is ready, all routes.
    assert "/v1/embeddings" not in doc["paths"] and "/v1/embeddings" in unready["paths"]
    for path, model in bodies.items():
        op = (doc if path in doc["paths"] else unready)["paths"][path]["post"]
        assert op["requestBody"]["required"] is True
        assert op["requestBody"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
    for path, statuses in ERROR_STATUSES.items():
        op = next(iter((doc if path in doc["paths"] else unready)["paths"][path].values()))
        assert op["security"] == [{"HTTPBearer": []}], path
        responses = {int(k): v for k, v in op["responses"].items()}
        assert set(responses) == {200} | statuses, (path, sorted(responses))
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}, (path, status)
            assert ("Retry-After" in responses[status].get("headers", {})) == (status in (429, 503))
        assert "$ref" in responses[200]["content"]["application/json"]["schema"], path
    for path, chunk in (("/v1/completions", "CompletionResponse"),
                        ("/v1/chat/completions", "ChatCompletionChunk")):
        stream = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        assert stream["x-sse-data"] == {"$ref": f"#/components/schemas/{chunk}"}
        assert chunk in schemas
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["type"] == "http"
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    metrics = doc["paths"]["/metrics"]["get"]
    assert "security" not in metrics and "security" not in doc["paths"]["/health"]["get"]
    assert set(metrics["responses"]["200"]["content"]) == {"text/plain"}
    health = doc["paths"]["/health"]["get"]["responses"]
    assert {s: health[s]["content"]["application/json"]["schema"]["$ref"]
            for s in ("200", "503")} == dict.fromkeys(("200", "503"),
                                                      "#/components/schemas/HealthStatus")
    error = schemas["ErrorInfo"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}


def test_document_states_the_served_limits_and_what_is_not_supported_yet(fake):
    _, doc, unready = fake
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = doc["components"]["schemas"][name]["properties"]
        assert props["model"]["enum"] == ["fake", "default"]
        assert props["max_tokens"]["anyOf"][0]["maximum"] == LIMITS.max_model_len - 1
        assert props["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 16}
        # the penalties, logit_bias and n are served with their declared ranges
        assert props["presence_penalty"]["anyOf"][0] == {"type": "number", "minimum": -2,
                                                         "maximum": 2}
        assert "maxProperties" not in props["logit_bias"]["anyOf"][0]
        assert "not supported" not in json.dumps(props["temperature"])
        assert props["temperature"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 2}
        assert props["stop"]["anyOf"][1]["maxItems"] == MAX_STOP_SEQUENCES
        # the models declare OpenAI's ranges; the document narrows what is refused today
        raw = getattr(schemas_module, name).model_json_schema()["properties"]
        assert raw["presence_penalty"]["anyOf"][0] == {"type": "number", "minimum": -2,
                                                       "maximum": 2}
        assert raw["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 16}
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["logprobs"]["anyOf"][0]["maximum"] == LIMITS.max_logprobs
    token = props["prompt"]["anyOf"][1]["items"]
    assert token == {"type": "integer", "minimum": 0, "maximum": LIMITS.vocab_size - 1}
    assert "enum" not in unready["components"]["schemas"]["CompletionRequest"]["properties"][
        "model"]


# ------------------------------------------------------------ schema <=> validator agree
BASES = {"/v1/completions": ("CompletionRequest", {"model": "fake", "prompt": "hi",
                                                   "max_tokens": 2}),
         "/v1/chat/completions": ("ChatCompletionRequest", {
             "model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})}
# (Not " ": the fake tokenizer gives it no tokens, which no schema of the text can know.)
POOL = [None, 0, 1, -1, 2, 5, 6, 17, 0.0, 1.0, 0.5, 2.5, -2.5, 1e9, 2**31, 2**32, "", "a", "1",
        True, False, [], ["a"], [""], ["a"] * (MAX_STOP_SEQUENCES + 1), [1], [1.0], [0.5],
        [-1], [[1]], [[]], [99], [100], {}, {"1": 1}, {"x": 1}, {"1": 500},
        {"include_usage": True}, {"include_usage": 1}, [{"role": "user", "content": "a"}]]
HANDWRITTEN = {
    "/v1/completions": [
        {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}},
        {"prompt": "x", "stream": False, "stream_options": {"include_usage": True}},
        {"prompt": "x", "stream_options": None},
        {"prompt": ["ab", "cd"], "max_tokens": 1}, {"prompt": [[1, 2], [3]]},
        {"prompt": "x", "logprobs": 5}, {"prompt": "x", "logprobs": 6}, {"prompt": "x", "seed": 7.0},
        {"prompt": "x", "max_tokens": LIMITS.max_model_len - 2},
        {"prompt": "x", "max_tokens": LIMITS.max_model_len}, {"prompt": "x", "suffix": "y"},
        {"prompt": "x", "best_of": 1}, {"prompt": "x", "best_of": 2}, {"prompt": "x", "echo": True},
        {"prompt": "x", "stop": ["a"] * MAX_STOP_SEQUENCES}, {"prompt": "x", "top_p": 1e-9},
        {"prompt": "x", "temperature": 2.0001}, {"prompt": "x", "repetition_penalty": 1.0},
        {"prompt": "x", "top_k": 2**31 - 1}, {"prompt": "x", "frequency_penalty": 0.0},
        {"prompt": "x", "logit_bias": {"5": 0}}, {"prompt": "x", "unknown": 1}],
    "/v1/chat/completions": [
        {"logprobs": True, "top_logprobs": 5}, {"logprobs": True, "top_logprobs": 6},
        {"logprobs": False, "top_logprobs": 1}, {"top_logprobs": 0}, {"top_logprobs": None},
        {"logprobs": True}, {"max_completion_tokens": 3}, {"max_completion_tokens": 0},
        {"messages": [{"role": "developer", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": None, "name": "n"}]},
        {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
        {"stream": True, "stream_options": {"include_usage": False}},
        {"stream": None, "stream_options": {}}],
}


def bodies(doc: dict) -> list[tuple[str, dict]]:
    """Each field of each request set to each value of the pool, and the hand-written cases."""
    out = []
    for path, (name, base) in BASES.items():
        for field in sorted(doc["components"]["schemas"][name]["properties"]):
            out += [(path, {**base, field: value}) for value in POOL]
        out += [(path, {**base, **extra}) for extra in HANDWRITTEN[path]]
    return out


def test_schema_valid_exactly_when_accepted(fake):
    client, doc, _ = fake
    checked = {True: 0, False: 0}
    disagree = []
    for path, body in bodies(doc):
        valid = validator(doc, BASES[path][0]).is_valid(body)
        r = post(client, path, body)
        assert r.status_code in (200, 400), (path, body, r.text)
        if valid != (r.status_code == 200):
            disagree.append((path, body, valid, r.text[:200]))
        checked[valid] += 1
    assert not disagree, disagree[:10]
    assert checked[True] > 100 and checked[False] > 400, checked


def test_a_json_body_must_be_an_object_of_the_schema(fake):
    client, doc, _ = fake
    for raw in (b"", b"[]", b"null", b"{}", b'"x"'):
        assert not validator(doc, "CompletionRequest").is_valid(json.loads(raw or b"null"))
        assert_error(post(client, "/v1/completions", raw), 400,
                     "model" if raw == b"{}" else None)


# ---------------------------------------------------------- fixed messages (issue 17)
def test_fixed_messages(fake):
    client, _, _ = fake

    def error(path, body, status=400, param=None, code=None):
        return assert_error(post(client, path, body), status, param, code)["message"]

    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    completion = {"model": "fake", "prompt": "hi", "max_tokens": 2}
    # JSON Schema's integers: 0.0 is the integer 0, 0.5 and "0" are not integers
    assert post(client, "/v1/completions", {**completion, "seed": 0.0}).status_code == 200
    assert "valid integer" in error("/v1/completions", {**completion, "seed": 0.5}, param="seed")
    error("/v1/completions", {**completion, "seed": "0"}, param="seed")
    assert error("/v1/chat/completions", {**chat, "top_logprobs": 2}, param="top_logprobs") \
        == "top_logprobs requires logprobs to be true"
    assert "less than or equal to 2" in error("/v1/completions", {**completion,
                                                                   "temperature": 1e9},
                                              param="temperature")
    assert error("/v1/completions", {**completion, "best_of": 3}, param="best_of",
                 code="unsupported") == "best_of=3 is not supported; use n"
    assert "at most 16 items" in error("/v1/completions", {**completion, "stop": ["x"] * 100},
                                       param="stop")
    # an empty prompt: refused by the schema, or (no tokens) with its own code
    assert "at least 1 character" in error("/v1/completions", {**completion, "prompt": ""},
                                           param="prompt")
    assert "at least 1 item" in error("/v1/completions", {**completion, "prompt": []},
                                      param="prompt")
    assert error("/v1/completions", {**completion, "prompt": " "}, param="prompt",
                 code="empty_prompt") == "the prompt is empty: it has no tokens"
    lone = b'{"model": "fake", "prompt": "ab\\ud800"}'
    message = error("/v1/completions", lone)
    at = lone.index(b"\\ud800")
    assert message.startswith(f"the request body is not valid JSON: \\ud800 at byte {at} is "
                              "half of a UTF-16 surrogate pair"), message
    assert "hex escape" not in message
    message = error("/v1/completions", b'{"model": "fake", "prompt": "\\udc00\\ud800"}')
    assert "\\udc00 at byte" in message
    assert post(client, "/v1/completions", json.dumps(  # a whole pair, escaped, is fine
        {**completion, "prompt": "\U0001F600"}, ensure_ascii=True).encode()).status_code == 200
    message = error("/v1/completions", b'{"model": "fake", "prompt": "\\x41"}')
    assert message.startswith("the request body is not valid JSON: invalid escape at line 1")
    assert "\\uXXXX" in message
    # NaN is not JSON (and not a number in range)
    error("/v1/completions", b'{"model": "fake", "prompt": "x", "temperature": NaN}',
          param="temperature")


def test_lone_surrogate_finder():
    assert lone_surrogate(b'"\\ud83d\\ude00 \\u0041"') is None             # a whole pair
    assert lone_surrogate(b'"\\\\ud800"') is None                         # an escaped backslash
    assert lone_surrogate(b'"a\\ud800"') == "\\ud800 at byte 2"
    assert lone_surrogate(b'"\\ud800\\u0041\\udc00"') == "\\ud800 at byte 1"
    assert lone_surrogate(b'"\\ud800\\ud800\\udc00"') == "\\ud800 at byte 1"
    assert lone_surrogate(b'"\\\\\\udc00"') == "\\udc00 at byte 3"


def test_413_before_parsing_declared_and_chunked():
    client, _, _ = fake_app(max_request_bytes=1000)
    big = json.dumps({"model": "fake", "prompt": "x" * 2000}).encode()
    err = assert_error(post(client, "/v1/completions", big), 413, code="request_too_large")
    assert f"has {len(big)} bytes, more than this server's limit of 1000" in err["message"]
    r = client.post("/v1/chat/completions", content=iter([big[:600], big[600:]]),
                    headers={"Content-Type": "application/json"})     # chunked: no length
    err = assert_error(r, 413, code="request_too_large")
    assert "larger than this server's limit of 1000 bytes" in err["message"]
    ok = post(client, "/v1/completions", {"model": "fake", "prompt": "x", "user": "u" * 900})
    assert ok.status_code == 200, ok.text                       # just under the limit


# ------------------------------------------------------------------- embeddings
EMBED_POOL = [None, 0, 1, -1, 2, 384, 1.0, 0.5, "", "a", True, [], ["a"], [""], [1], [-1],
              [1.5], [[101, 102]], [[]], "float", "base64", "int8"]


def test_embedding_schema_valid_exactly_when_accepted():
    pytest.importorskip("sentence_transformers")
    from arctic_jax.cli import build_parser
    from arctic_jax.serving.cli_commands import load_engine

    args = build_parser().parse_args([
        "serve", "--model", "all-MiniLM-L6-v2", "--served-model-name", "mini",
        "--max-model-len", "64", "--max-num-batched-tokens", "64", "--token-buckets", "64",
        "--max-num-seqs", "4", "--seq-buckets", "4", "--max-embedding-inputs", "3"])
    state = ServerState(served_model_name=args.served_model_name)
    load_engine(args, state)
    try:
        client = TestClient(create_app(state))
        doc = client.get("/openapi.json").json()
        assert "/v1/completions" not in doc["paths"]
        props = doc["components"]["schemas"]["EmbeddingRequest"]["properties"]
        assert props["input"]["anyOf"][1]["maxItems"] == 3
        check = validator(doc, "EmbeddingRequest")
        base = {"model": "mini", "input": "hello"}
        # truncate_prompt_tokens: a text needs room for [CLS] and [SEP] besides (not stated)
        cases = [{**base, field: value} for field in sorted(props) for value in EMBED_POOL
                 if field != "truncate_prompt_tokens"]
        cases += [{**base, "truncate_prompt_tokens": k} for k in (-2, -1, 0, 5, 64, 65)]
        cases += [{**base, "input": ["a"] * 4}, {**base, "normalize": True},
                  {**base, "input": [[101, 7592, 102], [101, 102]]}, {"input": "x"}]
        disagree, accepted = [], 0
        for body in cases:
            r = post(client, "/v1/embeddings", body)
            assert r.status_code in (200, 400), (body, r.text)
            accepted += r.status_code == 200
            if check.is_valid(body) != (r.status_code == 200):
                disagree.append((body, r.text[:200]))
        assert not disagree, disagree[:10]
        assert 20 < accepted < len(cases) - 60, (accepted, len(cases))
    finally:
        state.shutdown()


# ------------------------------------------------------------------- live server
MODEL = "smollm2-test"
API_KEY = "sk-contract"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SERVER_ARGS = tiny_server_args(MODEL, "--api-key", API_KEY)
GOOD = {"model": MODEL, "prompt": "Tell me about lighthouses.", "max_tokens": 24,
        "temperature": 0, "ignore_eos": True}
TWENTY_MB = 20 * 10**6


@pytest.fixture(scope="module")
def live():
    yield from running_server(SERVER_ARGS)


def live_post(server, path, body, **kw) -> httpx.Response:
    """POST a JSON ``body`` (a dict), or raw bytes, or chunks (an iterator: no length sent)."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return httpx.post(server.url + path, content=raw, timeout=120,
                      headers={**AUTH, "Content-Type": "application/json"}, **kw)


def running(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(r"^arctic_num_requests_running (\S+)$", text, re.MULTILINE).group(1))


def test_live_fixed_messages_and_json_integers(live):
    sampled = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0}
    texts = [live_post(live, "/v1/completions", {**sampled, "seed": seed}).json()
             ["choices"][0]["text"] for seed in (0, 0.0, 1.0, 1)]
    assert texts[0] == texts[1] and texts[2] == texts[3], texts
    r = live_post(live, "/v1/completions", {**sampled, "prompt": ""})
    assert "at least 1 character" in assert_error(r, 400, "prompt")["message"]
    r = live_post(live, "/v1/completions", b'{"model": "%s", "prompt": "\\ud83d"}' % MODEL.encode())
    assert "half of a UTF-16 surrogate pair" in assert_error(r, 400)["message"]
    r = httpx.post(live.url + "/v1/completions", json=sampled, timeout=30)   # no key
    assert_error(r, 401, code="invalid_api_key")


def test_live_document_agrees_with_the_server(live):
    doc = httpx.get(live.url + "/openapi.json", timeout=30).json()
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["model"]["enum"] == [MODEL, "default"]
    assert props["top_logprobs"]["anyOf"][0]["maximum"] == 5       # the default --max-logprobs
    assert props["max_tokens"]["anyOf"][0]["maximum"] == 255
    assert "/v1/embeddings" not in doc["paths"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    cases = [{}, {"model": "default"}, {"model": "gpt-4"}, {"seed": 3.0}, {"seed": 3.5},
             {"temperature": 2}, {"temperature": 2.5}, {"top_p": 0}, {"n": 1}, {"n": 2}, {"n": 17},
             {"presence_penalty": 0}, {"presence_penalty": 0.1}, {"logprobs": True,
                                                                  "top_logprobs": 5},
             {"logprobs": True, "top_logprobs": 6}, {"top_logprobs": 1},
             {"stop": ["a"] * 16}, {"stop": ["a"] * 17}, {"max_tokens": 0}, {"max_tokens": 256},
             {"logit_bias": {}}, {"logit_bias": {"1": 1}}, {"stream_options": {}}]
    check = validator(doc, "ChatCompletionRequest")
    for extra in cases:
        body = {**chat, **extra}
        r = live_post(live, "/v1/chat/completions", body)
        assert check.is_valid(body) == (r.status_code == 200), (body, r.status_code, r.text)


def test_live_20mb_body_gets_413_at_once_beside_a_running_request(live):
    alone = live_post(live, "/v1/completions", GOOD)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["text"]

    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(r=live_post(live, "/v1/completions",
                                                                       GOOD)))
    runner.start()
    deadline = time.monotonic() + 30
    while running(live) != 1:
        assert runner.is_alive() and time.monotonic() < deadline, "the good request never ran"
        time.sleep(0.05)
    prompt = "lighthouse keeper " * (TWENTY_MB // 18)
    big = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1}).encode()
    assert len(big) > TWENTY_MB
    start = time.monotonic()
    r = live_post(live, "/v1/completions", big)
    declared = time.monotonic() - start
    err = assert_error(r, 413, code="request_too_large")
    assert f"has {len(big)} bytes, more than this server's limit of {8 << 20}" in err["message"]

    def chunks():
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    start = time.monotonic()
    r = live_post(live, "/v1/chat/completions", chunks())
    chunked = time.monotonic() - start
    assert_error(r, 413, code="request_too_large")
    # Tokenizing 20 MB takes over 10 s of a core; refusing it takes the upload's time.
    assert declared < 5 and chunked < 5, (declared, chunked)
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["choices"][0]["text"] == expected
    # below the limit, a big body is parsed and tokenized: its own 400, not 413
    r = live_post(live, "/v1/completions", {**GOOD, "prompt": "lighthouse " * 50_000})
    assert_error(r, 400, "prompt", "context_length_exceeded")
