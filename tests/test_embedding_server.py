"""``arctic-jax serve`` with an embedding model: POST /v1/embeddings through the official
``openai`` client.

Two servers run in this process (uvicorn on a thread, loaded by the ``serve`` command's own
``load_engine`` from parsed ``serve`` flags): the embedded all-MiniLM-L6-v2 (normalised, no
Matryoshka dimensions) and a copy of it whose config.json declares Matryoshka dimensions.
Oracles: sentence-transformers on the same checkpoint, the HF tokenizer's token counts, and
numpy base64 decoding.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from arctic_jax.cli import build_parser
from arctic_jax.serving.app import ServerState, create_app
from arctic_jax.serving.cli_commands import free_port, load_engine
from arctic_jax.serving.embeddings import base64_rows
from checkpoints.loader import default_embedding_model_path
from helpers import cosine

uvicorn = pytest.importorskip("uvicorn")
st = pytest.importorskip("sentence_transformers")

MODEL = "minilm-test"
MAX_INPUTS = 32
MAX_MODEL_LEN = 256          # all-MiniLM-L6-v2's sentence-transformers max_seq_length
SERVER_ARGS = ["--model", "all-MiniLM-L6-v2", "--served-model-name", MODEL,
               "--max-num-batched-tokens", "512", "--token-buckets", "64,512",
               "--max-num-seqs", "16", "--seq-buckets", "16",
               "--max-embedding-inputs", str(MAX_INPUTS)]
MATRYOSHKA = (96, 128, 192)  # 96 and 192 dims are whole base64 groups per row; 128 is not
MATRYOSHKA_ARGS = ["--served-model-name", "minilm-mrl", "mrl", "--max-model-len", "128",
                   "--max-num-batched-tokens", "128", "--token-buckets", "128",
                   "--max-num-seqs", "8", "--seq-buckets", "8"]
TEXTS = ["hello world",
         "The quick brown fox jumps over the lazy dog.",
         "Embeddings map text to vectors; similar meanings land close together. " * 5,
         "a",
         "Packed sequences of different lengths share one device batch without padding."]


class InProcessServer:
    """``arctic-jax serve ARGS`` in this process: the engine loaded and warmed up by
    ``load_engine``, the app served by uvicorn on a thread."""

    def __init__(self, argv: list[str]):
        args = build_parser().parse_args(["serve", *argv])
        self.state = ServerState(served_model_name=args.served_model_name)
        load_engine(args, self.state)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), host="127.0.0.1",
                                                    port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    @property
    def engine(self):
        return self.state.engine.engine

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.state.shutdown()
        self.engine.close()


@pytest.fixture(scope="module")
def server():
    srv = InProcessServer(SERVER_ARGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def mrl_server(tmp_path_factory):
    """The MiniLM checkpoint with ``matryoshka_dimensions`` in config.json (other files are
    symlinks); its converted weights are cached in a temporary folder."""
    source = default_embedding_model_path()
    directory = tmp_path_factory.mktemp("minilm-mrl")
    for name in os.listdir(source):
        if name != "config.json":
            os.symlink(os.path.join(source, name), directory / name)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    (directory / "config.json").write_text(json.dumps({**config,
                                                       "matryoshka_dimensions": list(MATRYOSHKA)}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCTIC_JAX_CACHE", str(tmp_path_factory.mktemp("converted")))
        srv = InProcessServer(["--model", str(directory), *MATRYOSHKA_ARGS])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers on the same checkpoint (f32, CPU)."""
    return st.SentenceTransformer(default_embedding_model_path(), device="cpu")


@pytest.fixture(scope="module")
def hf_tokenizer(server):
    return server.state.embedding_tokenizer.tokenizer


def vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    assert all(d.object == "embedding" for d in response.data)
    return np.array([d.embedding for d in response.data])


def post(server, body, path="/v1/embeddings") -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.MULTILINE)
    assert m is not None, f"metric {name} missing"
    return float(m.group(1))


def renormalised(x: np.ndarray, d: int) -> np.ndarray:
    x = x[:, :d]
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- results
def test_openai_client_base64_and_float_match_sentence_transformers(server, client, reference):
    default = client.embeddings.create(model=MODEL, input=TEXTS)       # asks for base64
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert default.model == floats.model == MODEL and default.object == "list"
    got = vectors(floats)
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_array_equal(vectors(default), got)
    expected = reference.encode(TEXTS, convert_to_numpy=True)
    assert cosine(got, expected).min() >= 0.99999
    assert vectors(client.embeddings.create(model=MODEL, input=TEXTS[2])).shape == (1, 384)

    # The raw base64 is each vector's little-endian float32 bytes.
    r = post(server, {"model": MODEL, "input": TEXTS[:2], "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["id"].startswith("embd-")
    raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                    for d in body["data"]])
    np.testing.assert_array_equal(raw, got[:2].astype(np.float32))


def test_usage_lists_and_token_id_inputs(server, client, hf_tokenizer):
    ids = [hf_tokenizer(t)["input_ids"] for t in TEXTS]
    texts = client.embeddings.create(model=MODEL, input=TEXTS)
    assert texts.usage.prompt_tokens == texts.usage.total_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model=MODEL, input=ids)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    np.testing.assert_allclose(vectors(by_ids), vectors(texts), atol=1e-6)
    single = client.embeddings.create(model=MODEL, input=ids[1])      # one token-id list
    assert single.usage.prompt_tokens == len(ids[1]) and len(single.data) == 1
    np.testing.assert_allclose(vectors(single)[0], vectors(texts)[1], atol=1e-6)
    # The engine's own call gives the same vectors.
    np.testing.assert_allclose(server.engine.embed_token_ids(ids), vectors(texts), atol=1e-6)


def test_truncate_prompt_tokens_and_normalize(server, client, hf_tokenizer):
    words = ["lantern", "river", "copper", "violet", "mountain", "quiet", "harbor", "seven"]
    long_text = " ".join(words[i] for i in np.random.default_rng(3).integers(0, len(words), 300))
    full_ids = hf_tokenizer(long_text)["input_ids"]
    assert len(full_ids) > MAX_MODEL_LEN
    kept = client.embeddings.create(model=MODEL, input=["short", long_text],
                                    extra_body={"truncate_prompt_tokens": 20})
    # vLLM's left truncation: the last tokens of the text, special tokens kept.
    left = full_ids[:1] + full_ids[-19:]
    assert kept.usage.prompt_tokens == len(hf_tokenizer("short")["input_ids"]) + 20
    alone = client.embeddings.create(model=MODEL, input=[left])
    np.testing.assert_allclose(vectors(kept)[1], vectors(alone)[0], atol=1e-6)
    ids = client.embeddings.create(model=MODEL, input=[full_ids],
                                   extra_body={"truncate_prompt_tokens": -1})   # max_model_len
    assert ids.usage.prompt_tokens == MAX_MODEL_LEN
    np.testing.assert_allclose(
        vectors(ids)[0],          # a token-id input keeps its leading [CLS] when cut
        vectors(client.embeddings.create(model=MODEL, input=[full_ids[:1] + full_ids[-255:]]))[0],
        atol=1e-6)

    normal = client.embeddings.create(model=MODEL, input=TEXTS, extra_body={"normalize": True})
    np.testing.assert_array_equal(vectors(normal), vectors(client.embeddings.create(
        model=MODEL, input=TEXTS)))
    np.testing.assert_allclose(np.linalg.norm(vectors(normal), axis=-1), 1.0, atol=1e-6)


def test_matryoshka_dimensions_truncate_and_renormalise(mrl_server, reference):
    client = mrl_server.client()
    full = vectors(client.embeddings.create(model="minilm-mrl", input=TEXTS, encoding_format="float"))
    assert cosine(full, reference.encode(TEXTS, convert_to_numpy=True)).min() >= 0.99999
    for d in MATRYOSHKA:
        b64 = client.embeddings.create(model="minilm-mrl", input=TEXTS, dimensions=d)
        floats = client.embeddings.create(model="minilm-mrl", input=TEXTS, dimensions=d,
                                          encoding_format="float")
        got = vectors(floats)
        assert got.shape == (len(TEXTS), d)
        np.testing.assert_array_equal(vectors(b64), got)
        np.testing.assert_allclose(got, renormalised(full, d), atol=1e-6)
    same = client.embeddings.create(model="minilm-mrl", input=TEXTS, dimensions=384,
                                    encoding_format="float")
    np.testing.assert_array_equal(vectors(same), full)
    r = post(mrl_server, {"model": "minilm-mrl", "input": "x", "dimensions": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    assert "Matryoshka dimensions: 96, 128, 192" in r.json()["error"]["message"]


def test_every_served_name_is_listed_and_accepted(mrl_server):
    """``--served-model-name minilm-mrl mrl``: both listed and accepted, responses carry the
    first; the checkpoint's own name and ``default`` are not accepted."""
    models = httpx.get(mrl_server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["minilm-mrl", "mrl"]
    first = post(mrl_server, {"model": "minilm-mrl", "input": TEXTS[:2]})
    second = post(mrl_server, {"model": "mrl", "input": TEXTS[:2]})
    assert first.status_code == second.status_code == 200, second.text
    assert second.json()["model"] == "minilm-mrl"
    assert second.json()["data"] == first.json()["data"]
    for name in ("all-MiniLM-L6-v2", "default"):
        r = post(mrl_server, {"model": name, "input": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"


def test_base64_rows_equal_per_row_encoding():
    rng = np.random.default_rng(0)
    for d in (1, 2, 3, 96, 128, 384):
        emb = rng.normal(size=(5, d)).astype(np.float32)
        expected = [base64.b64encode(row.astype("<f4").tobytes()).decode() for row in emb]
        assert base64_rows(emb) == expected


def test_normalize_request_against_the_models_own_normalisation():
    from arctic_jax.serving.embeddings import _normalize_on_host
    from arctic_jax.serving.errors import APIError

    assert [_normalize_on_host(r, False) for r in (None, True, False)] == [False, True, False]
    assert [_normalize_on_host(r, True) for r in (None, True)] == [False, False]
    with pytest.raises(APIError, match="normalize=false is not supported"):
        _normalize_on_host(False, True)


# ----------------------------------------------------------------------------- errors
LONG = "lantern " * 300
# name -> (JSON body or raw bytes, status, param, words the message must hold, code or None)
BAD = {
    "empty_string": ({"input": ""}, 400, "input", "input 0 is an empty string", None),
    "empty_list": ({"input": []}, 400, "input", "input is empty", None),
    "empty_token_list": ({"input": [[]]}, 400, "input", "input 0 is empty", None),
    "one_empty_text": ({"input": ["a", ""]}, 400, "input", "input 1 is an empty string", None),
    "text_too_long": ({"input": ["a", LONG]}, 400, "input",
                      "input 1 has 302 tokens, more than this model's maximum of 256",
                      "context_length_exceeded"),
    "ids_too_long": ({"input": [[101] * 300]}, 400, "input", "input 0 has 300 tokens",
                     "context_length_exceeded"),
    "id_out_of_vocab": ({"input": [[101, 30522, 102]]}, 400, "input",
                        "token id 30522 outside [0, 30522)", None),
    "negative_id": ({"input": [101, -1, 102]}, 400, "input", "token id -1 outside", None),
    "too_many_inputs": ({"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input",
                        f"too many inputs: {MAX_INPUTS + 1}", None),
    "input_number": ({"input": 5}, 400, "input", "invalid value for 'input'", None),
    "input_mixed": ({"input": ["a", 1]}, 400, "input", "invalid value for 'input'", None),
    "input_float_ids": ({"input": [[1.5, 2.0]]}, 400, "input", "invalid value", None),
    "input_bool_ids": ({"input": [True, False]}, 400, "input", "invalid value", None),
    "missing_input": ({"input": None}, 400, "input", "missing required argument: input", None),
    "bad_encoding": ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format",
                     "invalid value", None),
    "dimensions_string": ({"input": "x", "dimensions": "128"}, 400, "dimensions",
                          "invalid value", None),
    "dimensions_not_matryoshka": ({"input": "x", "dimensions": 128}, 400, "dimensions",
                                  "does not support the dimensions parameter", None),
    "dimensions_zero": ({"input": "x", "dimensions": 0}, 400, "dimensions", "at least 1", None),
    "unknown_field": ({"input": "x", "embed_dtype": "float16"}, 400, "embed_dtype",
                      "unrecognized request argument", None),
    "unknown_model": ({"input": "x", "model": "text-embedding-3-small"}, 400, "model",
                      "does not exist", "model_not_found"),
    "truncate_zero": ({"input": "x", "truncate_prompt_tokens": 0}, 400,
                      "truncate_prompt_tokens", "-1 or in 1..256", None),
    "truncate_too_big": ({"input": "x", "truncate_prompt_tokens": 300}, 400,
                         "truncate_prompt_tokens", "-1 or in 1..256", None),
    "truncate_no_room": ({"input": "x", "truncate_prompt_tokens": 2}, 400,
                         "truncate_prompt_tokens", "no room", None),
    "normalize_false": ({"input": "x", "normalize": False}, 400, "normalize",
                        "normalize=false is not supported", "unsupported"),
    "unknown_prompt": ({"input": "x", "prompt_name": "query"}, 400, "prompt_name",
                       "unknown prompt_name 'query'", None),
    "prompt_with_ids": ({"input": [101, 102], "prompt_name": "query"}, 400, "prompt_name",
                        "text inputs only", None),
    "malformed_json": (b'{"model": "minilm-test", "input": ', 400, None, "not valid JSON", None),
    "not_an_object": (b"[1, 2]", 400, None, "must be a JSON object", None),
}
WRONG_TASK = {"/v1/completions": {"model": MODEL, "prompt": "hi"},
              "/v1/chat/completions": {"model": MODEL,
                                       "messages": [{"role": "user", "content": "hi"}]}}


def _bad_request(client: httpx.AsyncClient, body) -> object:
    if isinstance(body, bytes):
        return client.post("/v1/embeddings", content=body,
                           headers={"content-type": "application/json"})
    body = {"model": MODEL, **body}
    if body.get("input", 0) is None:
        del body["input"]
    return client.post("/v1/embeddings", json=body)


def test_bad_inputs_get_4xx_while_a_good_request_succeeds(server, client, reference):
    good_texts = [t + f" {i}" for i in range(4) for t in TEXTS]     # 20 inputs, several batches
    expected = reference.encode(good_texts, convert_to_numpy=True)
    requests_before = metric(server, "arctic_embedding_requests_total")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            good = c.post("/v1/embeddings", json={"model": MODEL, "input": good_texts,
                                                  "encoding_format": "float"})
            bad = [_bad_request(c, body) for body, *_ in BAD.values()]
            wrong = [c.post(path, json=body) for path, body in WRONG_TASK.items()]
            return await asyncio.gather(good, *bad, *wrong)

    good, *rest = asyncio.run(main())
    assert good.status_code == 200, good.text
    got = np.array([d["embedding"] for d in good.json()["data"]])
    assert cosine(got, expected).min() >= 0.99999
    for (name, (_, status, param, words, code)), r in zip(BAD.items(), rest, strict=False):
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["type"] == "invalid_request_error", name
        assert error["param"] == param, (name, error)
        assert words in error["message"], (name, error["message"])
        assert error["code"] == code, (name, error)
    for path, r in zip(WRONG_TASK, rest[len(BAD):], strict=True):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_task" and error["param"] == "model"
        assert f"'{MODEL}' is an embedding model" in error["message"]
        assert "/v1/embeddings" in error["message"] and path in error["message"]
    # Only the good request reached the engine; the server still serves.
    assert metric(server, "arctic_embedding_requests_total") == requests_before + 1
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    again = client.embeddings.create(model=MODEL, input=good_texts[:3], encoding_format="float")
    np.testing.assert_allclose(vectors(again), got[:3], atol=1e-6)


# ----------------------------------------------------------------------------- the rest
def test_health_models_and_metrics(server, client, hf_tokenizer):
    r = httpx.get(server.url + "/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL] == [m.id for m in client.models.list()]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN

    names = ("arctic_embedding_requests_total", "arctic_embedding_prompt_tokens_total",
             "arctic_embedding_inputs_total", "arctic_embedding_batches_total",
             "arctic_embedding_queue_time_seconds_count")
    before = {n: metric(server, n) for n in names}
    resp = client.embeddings.create(model=MODEL, input=TEXTS)
    after = {n: metric(server, n) for n in names}
    assert after["arctic_embedding_requests_total"] == before["arctic_embedding_requests_total"] + 1
    assert after["arctic_embedding_prompt_tokens_total"] == \
        before["arctic_embedding_prompt_tokens_total"] + resp.usage.prompt_tokens
    assert after["arctic_embedding_inputs_total"] == before["arctic_embedding_inputs_total"] + 5
    assert after["arctic_embedding_batches_total"] > before["arctic_embedding_batches_total"]
    assert after["arctic_embedding_queue_time_seconds_count"] == \
        before["arctic_embedding_queue_time_seconds_count"] + 1
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    fill_count = metric(server, "arctic_embedding_batch_fill_ratio_count")
    assert fill_count == after["arctic_embedding_batches_total"]
    assert 0 < metric(server, "arctic_embedding_batch_fill_ratio_sum") <= fill_count


def test_concurrent_requests_and_no_compilation_while_serving(server, reference):
    seed = int(np.random.SeedSequence().entropy % (2 ** 31))
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    engine = server.engine
    requests = []
    for _ in range(12):
        n = int(rng.integers(1, 8))
        words = rng.integers(1, 200, n)
        requests.append([" ".join(["river"] * int(w)) + f" {i}" for i, w in enumerate(words)])
    expected = [reference.encode(texts, convert_to_numpy=True) for texts in requests]
    engine.compile_counter.count = 0   # process-wide: only what serving compiles from here

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*(
                c.post("/v1/embeddings", json={"model": MODEL, "input": texts,
                                               "encoding_format": ("float", "base64")[i % 2]})
                for i, texts in enumerate(requests)))

    responses = asyncio.run(main())
    for i, (r, exp) in enumerate(zip(responses, expected, strict=True)):
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        got = np.array([d["embedding"] for d in data]) if i % 2 == 0 else np.stack(
            [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in data])
        assert cosine(got, exp).min() >= 0.99999
    assert engine.compiles_after_warmup == 0


def test_serve_flags_have_help_and_mismatched_flags_fail_before_loading():
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    for action in serve._actions:
        assert action.help, action.option_strings
    text = serve.format_help()
    for flag in ("--seq-buckets", "--max-embedding-inputs", "all-MiniLM-L6-v2", "/v1/embeddings"):
        assert flag in text
    for argv, words in [
        (["--model", "all-MiniLM-L6-v2", "--page-size", "32", "-tp", "2"],
         "--page-size, --tensor-parallel-size: not for an embedding model"),
        (["--model", "all-MiniLM-L6-v2", "-dp", "2"], "--data-parallel-size: not for an embedding"),
        (["--model", "default", "--seq-buckets", "8"], "--seq-buckets applies to embedding models"),
        (["--model", "default", "--max-embedding-inputs", "8"],
         "--max-embedding-inputs applies to embedding models"),
    ]:
        args = parser.parse_args(["serve", *argv])
        state = ServerState()
        with pytest.raises(ValueError, match=re.escape(words)):
            load_engine(args, state)
        assert state.engine is None
