"""The ``EngineFront`` protocol: both fronts implement it, and the server needs nothing else.

A fake front with random limits (no ``LLMEngine`` behind it) serves completions through the
real FastAPI app, so any read of engine internals by the app fails here.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from arctic_jax.bench import runner
from arctic_jax.engine.async_engine import AsyncEngine
from arctic_jax.engine.front import EngineFront, EngineLimits
from arctic_jax.engine.replicas import ReplicaRouter
from arctic_jax.engine.request import FinishReason, RequestOutput

KWARGS = dict(max_num_seqs=3, max_num_batched_tokens=32, max_model_len=48, page_size=8,
              max_logprobs=4, token_buckets=(8, 32), page_buckets=(8,))


def test_limits_reject_bad_values():
    good = dict(vocab_size=10, max_model_len=8, max_logprobs=0, max_num_seqs=1)
    EngineLimits(**good)
    for name, bad in [("vocab_size", 0), ("max_model_len", -1), ("max_num_seqs", 0),
                      ("max_logprobs", -1)]:
        with pytest.raises(ValueError, match=name):
            EngineLimits(**dict(good, **{name: bad}))


def test_async_engine_and_router_are_fronts_with_the_engines_limits():
    engine, _ = runner.build_random_engine("tiny", KWARGS, seed=3)
    want = EngineLimits(vocab_size=engine.cfg.vocab_size, max_model_len=48, max_logprobs=4,
                        max_num_seqs=3)
    one = AsyncEngine(engine)
    router = ReplicaRouter([one])
    for front in (one, router):
        assert isinstance(front, EngineFront)
        assert front.limits() == want
        front.validate_prompt([1, 2, 3])
        with pytest.raises(ValueError, match="empty"):
            front.validate_prompt([])
        with pytest.raises(ValueError, match="context length is 48"):
            front.validate_prompt([1] * 48)
        with pytest.raises(ValueError, match="out of range"):
            front.validate_prompt([want.vocab_size])
    assert one.cached_prefix_tokens(list(range(1, 30))) == 0   # nothing cached yet


@dataclasses.dataclass
class FakeFront:
    """An ``EngineFront`` and nothing more: answers each prompt with its ids reversed."""

    limits_: EngineLimits
    error: BaseException | None = None
    alive: bool = True
    failed_replicas: list = dataclasses.field(default_factory=list)
    aborted: list = dataclasses.field(default_factory=list)

    def limits(self) -> EngineLimits:
        return self.limits_

    def validate_prompt(self, prompt_ids):
        if not 1 <= len(prompt_ids) < self.limits_.max_model_len:
            raise ValueError(f"fake: the prompt has {len(prompt_ids)} tokens")

    async def generate(self, prompt_ids, params, request_id):
        out = list(reversed(prompt_ids))[:params.max_tokens]
        for k, token in enumerate(out):
            last = k == len(out) - 1
            yield RequestOutput(request_id=request_id, new_token_ids=[token], new_text=f"<{token}>",
                                new_logprobs=[-0.5], new_top_logprobs=[[(token, -0.5)]],
                                finished=last, finish_reason=FinishReason.LENGTH if last else None,
                                num_prompt_tokens=len(prompt_ids), num_output_tokens=k + 1,
                                num_cached_tokens=0)

    def abort(self, request_id):
        self.aborted.append(request_id)

    def num_requests(self):
        return 0

    def render_metrics(self):
        return b"fake_metric 1.0\n"

    def start(self):
        pass

    def shutdown(self):
        pass


def test_server_uses_only_the_front():
    from fastapi.testclient import TestClient

    from arctic_jax.serving.app import ServerState, create_app

    rng = np.random.default_rng()
    limits = EngineLimits(vocab_size=int(rng.integers(50, 500)), max_model_len=int(rng.integers(20, 40)),
                          max_logprobs=int(rng.integers(1, 6)), max_num_seqs=2)
    fake = FakeFront(limits)
    assert isinstance(fake, EngineFront) and not hasattr(fake, "engine")
    state = ServerState()
    state.set_ready(fake, tokenizer=None, model_name="fake")
    client = TestClient(create_app(state))

    prompt = [int(t) for t in rng.integers(0, limits.vocab_size, 6)]
    r = client.post("/v1/completions", json={"model": "fake", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 200, r.text
    want = list(reversed(prompt))[:4]
    assert r.json()["choices"][0]["text"] == "".join(f"<{t}>" for t in want)
    assert r.json()["usage"]["completion_tokens"] == 4

    models = client.get("/v1/models").json()
    assert models["data"][0]["max_model_len"] == limits.max_model_len

    def error(body):
        r = client.post("/v1/completions", json={"model": "fake", **body})
        assert r.status_code == 400, r.text
        return r.json()["error"]

    e = error({"prompt": [limits.vocab_size], "max_tokens": 1})
    assert f"out of range [0, {limits.vocab_size})" in e["message"]
    e = error({"prompt": [1] * limits.max_model_len, "max_tokens": 1})
    assert e["code"] == "context_length_exceeded" and "fake:" in e["message"]
    e = error({"prompt": prompt, "max_tokens": limits.max_model_len})
    assert e["code"] == "context_length_exceeded" and f"{limits.max_model_len} tokens" in e["message"]
    e = error({"prompt": prompt, "max_tokens": 1, "logprobs": limits.max_logprobs + 1})
    assert f"at most {limits.max_logprobs} top logprobs" in e["message"]

    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/metrics").text == "fake_metric 1.0\n"
    fake.alive, fake.error = False, RuntimeError("fake failure")
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"] == "fake failure"
