"""The engine's CPU defaults (issue 16): the step token budget, one page bucket for the blocked
attention, and the blocked route through the whole engine against the plain reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.config import ModelConfig
from arctic_jax.engine.config import (
    CPU_MAX_NUM_BATCHED_TOKENS,
    EngineConfig,
    default_max_num_batched_tokens,
    resolve_scheduler_config,
)
from arctic_jax.engine.engine import LLMEngine
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingParams

CFG = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=6,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, eos_token_ids=())


class _Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


def _sched(**kw):
    return resolve_scheduler_config(CFG, EngineConfig(num_pages=64, max_model_len=256, **kw),
                                    jnp.float32)


def test_cpu_step_budget_default():
    assert jax.default_backend() == "cpu"
    assert _sched().max_num_batched_tokens == CPU_MAX_NUM_BATCHED_TOKENS == 128
    assert default_max_num_batched_tokens(32) == 128
    # never below max_num_seqs (every running sequence decodes in one step); explicit values kept
    assert _sched(max_num_seqs=200).max_num_batched_tokens == 200
    assert _sched(max_num_batched_tokens=48).max_num_batched_tokens == 48
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1"):
        _sched(max_num_batched_tokens=0)


def _engine(weights, impl: str | None) -> LLMEngine:
    return LLMEngine(LLAMA, CFG, weights, _Tok(), EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128, page_size=8, num_pages=64,
        token_buckets=(8, 16), attention_impl=impl, max_logprobs=0))


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    logprobs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += out.new_logprobs
    return [tokens[i] for i in ids], [logprobs[i] for i in ids]


def test_blocked_engine_matches_reference_engine():
    """Default (blocked, one page bucket) and plain reference engines (page buckets 8, 16) give
    the same greedy tokens for prompts chunked next to running decodes."""
    weights = random_weights(CFG, jax.random.PRNGKey(4), scale=0.3)
    blocked, reference = _engine(weights, None), _engine(weights, "reference")
    assert blocked.runner.routes[False].impl == "blocked"
    assert blocked.runner.buckets.pages == (16,)                     # 128 / 8: one bucket
    assert reference.runner.buckets.pages == (8, 16)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, CFG.vocab_size, n))) for n in (5, 70, 3, 41)]
    got_tokens, got_lp = _generate(blocked, prompts, 12)
    want_tokens, want_lp = _generate(reference, prompts, 12)
    assert got_tokens == want_tokens
    assert all(len(t) == 12 for t in got_tokens)
    np.testing.assert_allclose(np.concatenate(got_lp), np.concatenate(want_lp), atol=1e-4)
