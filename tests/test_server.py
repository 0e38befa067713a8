"""The OpenAI-compatible server end to end, through the official ``openai`` client.

One ``arctic-jax serve`` child process (embedded SmolLM2-135M, small engine
limits) serves the whole module. Checked: completions, chat and streaming
(streamed text equals the non-streamed text under greedy decoding), usage
against the tokenizer's own counts, logprobs, stop strings, seeds, 64
concurrent greedy requests equal to each request run alone, the prefix cache,
and that a client disconnect aborts its request and frees its KV pages.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import tempfile
import time
import urllib.parse

import httpx
import openai
import pytest

from arctic_jax.serving.cli_commands import ServerProcess
from helpers import server_env

MODEL = "smollm2-test"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MODEL_LEN = 256
SERVER_ARGS = ["--model", "default", "--served-model-name", MODEL,
               "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
               "--max-model-len", str(MAX_MODEL_LEN), "--page-size", "16",
               "--token-buckets", "8,64", "--page-buckets", "16",
               "--compilation-cache-dir",
               os.path.join(tempfile.gettempdir(), f"arctic-jax-test-xla-{os.getuid()}")]
WORDS = ("river stone cloud lantern market garden violin copper winter harbor meadow pencil "
         "orbit candle forest silver ladder window thunder pepper").split()


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(SERVER_ARGS, env=server_env(), cwd=REPO_ROOT)
    try:
        # The port opens before the model is loaded: record what clients see meanwhile.
        deadline = time.monotonic() + 120
        while (status := proc.health())[0] == 0:
            assert proc.proc.poll() is None and time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.05)
        proc.while_loading = (status, httpx.get(proc.url + "/v1/models"))
        proc.wait_ready(timeout=300)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from checkpoints import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def metrics(server) -> str:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def metric(text: str, name: str, labels: str = "") -> float:
    """Value of one sample of the Prometheus text (0 when the labelled sample is absent)."""
    sample = name + ("{" + labels + "}" if labels else "")
    pattern = "^" + re.escape(sample) + r" (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    if m is None:
        assert labels, f"metric {name} missing"
        return 0.0
    return float(m.group(1))


def wait_idle(server, timeout: float = 15.0) -> str:
    """Metrics once nothing runs, nothing waits and no KV page is in use."""
    deadline = time.monotonic() + timeout
    while True:
        text = metrics(server)
        busy = [metric(text, n) for n in ("arctic_num_requests_running",
                                          "arctic_num_requests_waiting",
                                          "arctic_kv_cache_usage_ratio")]
        if busy == [0, 0, 0]:
            return text
        assert time.monotonic() < deadline, f"server still busy after {timeout} s: {busy}"
        time.sleep(0.1)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


# ---------------------------------------------------------------- basics
def test_not_ready_while_loading_then_ready(server):
    health, models = server.while_loading
    assert health == (503, {"status": "loading"})
    assert models.status_code == 503
    assert models.json()["error"]["code"] == "not_ready"
    log = server.log_tail(100_000)
    assert "arctic-jax serve: ready" in log
    assert "arctic-jax serve: KV cache" in log   # what the cache reserved
    # on a CPU the 64-token steps compile after ready, in the background
    assert "compiling the programs of steps above 8 tokens in the background" in log
    assert re.search(r"compilation cache \S+: \d+ programs loaded, \d+ compiled\)", log), log


def test_health_models_and_metrics_format(server, client):
    r = httpx.get(server.url + "/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "arctic_kv_cache_usage_ratio" in r.text


def readme_requests() -> list[tuple[str, dict]]:
    """(path, JSON body) of each ``curl`` to /v1/completions or /v1/chat/completions in
    README.md's bash blocks, as written."""
    with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for url, body in re.findall(r"curl (?:-s )?(http://\S+).*?-d '([^']*)'",
                                    block.replace("\\\n", " ")):
            path = urllib.parse.urlsplit(url).path
            if path in ("/v1/completions", "/v1/chat/completions"):
                found.append((path, json.loads(body)))
    return found


def test_readme_requests_work_as_written(server):
    """The README's requests name the model "default": the embedded model's alias, accepted
    besides the --served-model-name (which /v1/models lists alone)."""
    requests = readme_requests()
    assert len(requests) >= 2 and all(b["model"] == "default" for _, b in requests), requests
    for path, body in requests:
        r = httpx.post(server.url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == MODEL
        n = body.get("n", 1)
        assert [c["index"] for c in out["choices"]] == list(range(n))
        for choice in out["choices"]:
            assert (choice["message"]["content"] if "chat" in path else choice["text"]).strip()
        assert 0 < out["usage"]["completion_tokens"] <= n * body["max_tokens"]
    r = httpx.post(server.url + "/v1/chat/completions", json={**requests[0][1], "model": "nope"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
    assert f"'{MODEL}' (also accepted: 'default')" in r.json()["error"]["message"]


def test_embeddings_route_on_a_generation_model_is_a_400(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_task", "model")
    assert f"'{MODEL}' is a text-generation model" in error["message"]
    assert "not /v1/embeddings" in error["message"]


def test_chat_answers_the_known_question(client, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=32)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    expected_prompt = len(tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert resp.usage.prompt_tokens == expected_prompt
    # the reply's tokens plus the end-of-turn token
    assert resp.usage.completion_tokens == len(tokenizer(choice.message.content)["input_ids"]) + 1
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streamed_chat_equals_non_streamed(client):
    messages = [{"role": "system", "content": "You are a poet."},
                {"role": "user", "content": "Write two lines about the sea."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_completion_tokens=24)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_completion_tokens=24, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    finishes = [c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_usage_and_streaming(client, tokenizer):
    prompt = "The old lighthouse keeper opened the door and"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    # the same prompt given as token ids gives the same completion
    ids = tokenizer(prompt)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text


def test_completion_batch_of_prompts(client):
    prompts = ["Once upon a time", "The recipe needs three eggs and"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
             for p in prompts]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_n_choices_are_the_seeded_copies_and_count_the_prompt_once(client):
    """n choices per prompt: choice p*n + i is prompt p sampled with seed + i (each equal to
    that request alone), with penalties applied; usage counts each prompt once."""
    prompts = ["The harbor at dawn was", "My favourite soup is made with"]
    kw = dict(model=MODEL, max_tokens=8, temperature=1.0, presence_penalty=0.7,
              frequency_penalty=0.3)
    batch = client.completions.create(prompt=prompts, n=3, seed=50, **kw)
    assert [c.index for c in batch.choices] == list(range(6))
    alone = [[client.completions.create(prompt=p, seed=50 + i, **kw) for i in range(3)]
             for p in prompts]
    assert [c.text for c in batch.choices] == [a.choices[0].text for row in alone for a in row]
    assert len({c.text for c in batch.choices}) > 2   # the copies sample differently
    assert batch.usage.prompt_tokens == sum(row[0].usage.prompt_tokens for row in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens
                                                for row in alone for a in row)
    # chat, streamed: each choice's deltas add up to the non-streamed choice
    messages = [{"role": "user", "content": "Name three rivers."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=7,
                                          temperature=1.0, max_completion_tokens=8)
    assert [c.index for c in full.choices] == [0, 1]
    texts = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=7,
                                                temperature=1.0, max_completion_tokens=8,
                                                stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    one = client.chat.completions.create(model=MODEL, messages=messages, seed=8,
                                         temperature=1.0, max_completion_tokens=8)
    assert one.choices[0].message.content == full.choices[1].message.content
    assert full.usage.prompt_tokens == one.usage.prompt_tokens


def test_completion_logprobs(client):
    prompt = "In the morning the baker"
    n_top = 3
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                     logprobs=n_top)
    choice = resp.choices[0]
    lp = choice.logprobs
    n = resp.usage.completion_tokens
    assert choice.finish_reason == "length" and n == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0
        assert n_top <= len(top) <= n_top + 1
        assert top[token] == value
        assert value == pytest.approx(max(top.values()))  # greedy picks the most likely token
    # streaming gives the same logprobs, token by token
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                            temperature=0, logprobs=n_top, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.tokens and offsets == lp.text_offset


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], temperature=0,
        max_tokens=5, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_stop_strings_and_seed(client):
    prompt = "A list of fruits: apple, banana,"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3 and text.find(stop) > 0
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                    stop=[stop, "@@no such text@@"])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    seeded = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                        temperature=1.0, top_p=0.95, seed=1234,
                                        extra_body={"top_k": 40, "min_p": 0.01}).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


# ----------------------------------------------------------- concurrency
def test_64_concurrent_requests_equal_each_run_alone(server, client):
    rng = random.Random(20261127)
    # 16 distinct greedy requests of mixed lengths, each sent 4 times concurrently
    specs = []
    for i in range(16):
        if i % 4 == 3:
            specs.append(("chat", words(rng, rng.randint(2, 30)), rng.randint(3, 12)))
        else:
            specs.append(("completion", words(rng, rng.randint(2, 60)), rng.randint(3, 14)))

    def alone(spec):
        kind, text, max_tokens = spec
        if kind == "chat":
            r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens,
                                               messages=[{"role": "user", "content": text}])
            return (r.choices[0].message.content, r.choices[0].finish_reason,
                    r.usage.completion_tokens)
        r = client.completions.create(model=MODEL, prompt=text, temperature=0,
                                      max_tokens=max_tokens)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    expected = [alone(s) for s in specs]
    order = list(range(16)) * 4
    rng.shuffle(order)

    async def one(aclient, k, spec):
        kind, text, max_tokens = spec
        stream = k % 3 == 0
        if kind == "chat":
            args = dict(model=MODEL, temperature=0, max_tokens=max_tokens,
                        messages=[{"role": "user", "content": text}])
        else:
            args = dict(model=MODEL, prompt=text, temperature=0, max_tokens=max_tokens)
        create = aclient.chat.completions.create if kind == "chat" else aclient.completions.create
        if not stream:
            r = await create(**args)
            out = r.choices[0].message.content if kind == "chat" else r.choices[0].text
            return out, r.choices[0].finish_reason, r.usage.completion_tokens
        pieces, finish, usage = [], None, None
        async for c in await create(**args, stream=True, stream_options={"include_usage": True}):
            if c.usage is not None:
                usage = c.usage.completion_tokens
            for ch in c.choices:
                pieces.append((ch.delta.content if kind == "chat" else ch.text) or "")
                finish = ch.finish_reason or finish
        return "".join(pieces), finish, usage

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                      max_retries=0, timeout=300) as aclient:
            return await asyncio.gather(*(one(aclient, k, specs[i]) for k, i in enumerate(order)))

    results = asyncio.run(run_all())
    mismatches = [(k, i, results[k], expected[i]) for k, i in enumerate(order)
                  if results[k] != expected[i]]
    assert not mismatches, mismatches[:3]
    wait_idle(server)


def test_prefix_cache_hits_and_keeps_outputs(server, client):
    rng = random.Random(7)
    system = "You are the archivist of the " + words(rng, 90) + "."

    def ask(question):
        return client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=8,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])

    cold = ask("What is kept in the vault?")
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    other = ask("Who guards the door?")
    warm = ask("What is kept in the vault?")
    assert other.usage.prompt_tokens_details.cached_tokens >= 96   # the shared system prompt
    assert warm.usage.prompt_tokens_details.cached_tokens >= 96
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert metric(metrics(server), "arctic_prefix_cache_hit_rate") > 0


# ------------------------------------------------------------ disconnect
def test_streaming_disconnect_aborts_request(server):
    before = metric(wait_idle(server), "arctic_requests_finished_total", 'reason="abort"')
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 2:
                        break
            assert seen == 2
            assert metric(metrics(server), "arctic_num_requests_running") == 1
    text = wait_idle(server, timeout=10)
    assert metric(text, "arctic_requests_finished_total", 'reason="abort"') == before + 1


def test_non_streaming_disconnect_aborts_request(server):
    before = metric(wait_idle(server), "arctic_requests_finished_total", 'reason="abort"')
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 200, "ignore_eos": True,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    text = wait_idle(server, timeout=10)
    assert metric(text, "arctic_requests_finished_total", 'reason="abort"') == before + 1


def test_everything_freed_at_the_end(server):
    text = wait_idle(server)
    assert metric(text, "arctic_num_requests_running") == 0
    assert metric(text, "arctic_kv_cache_usage_ratio") == 0
    assert httpx.get(server.url + "/health").status_code == 200
