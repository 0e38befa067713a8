"""Greedy output with speculation against without it, per dtype and attention implementation.

A random Llama (large weights, so its greedy choices depend on the context) generates for 24 prompts
twice: plainly, then with an oracle proposer that drafts the plain run's next three tokens and one
wrong token (so every verify step accepts drafts and rejects one). In float32 the two must agree
token for token on any device; in bfloat16 on a GPU the verify rows run through the ragged prefill
kernel and plain decodes through the decode kernel, so near-tied argmaxes may flip. Prints how many
requests agree per (dtype, attention).

    python benchmarks/speculative_exactness.py            # float32 (and bfloat16 on a GPU)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.bench.runner import TokenIdTokenizer
from arctic_jax.config import ModelConfig
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingParams

CFG = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
                  num_kv_heads=2, head_dim=64, max_position_embeddings=1024)


class OracleProposer:
    """Drafts the plain run's next 3 tokens, then one wrong token."""

    def __init__(self, truth: list[list[int]]):
        self.truth = truth

    def propose(self, requests, k):
        drafts = []
        for r in requests:
            rest = self.truth[int(r.request_id.split("-")[1]) - 1][len(r.output_ids):]
            drafts.append((rest[:3] + [(t + 1) % CFG.vocab_size for t in rest[3:4]])[:k])
        return drafts

    def on_tokens(self, request, new_tokens):
        pass

    def on_finish(self, request):
        pass


def generate(weights, prompts, impl: str, truth=None):
    ec = EngineConfig.from_flags(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
                                 attention_impl=impl, token_buckets=(16, 64, 256), page_buckets=(32,),
                                 speculative_config=({"method": "ngram", "num_speculative_tokens": 4}
                                                     if truth is not None else None))
    engine = LLMEngine(LLAMA, CFG, weights, TokenIdTokenizer(), ec)
    if truth is not None:
        engine.proposer = OracleProposer(truth)
    ids = [engine.add_request(p, SamplingParams(max_tokens=96, temperature=0, ignore_eos=True))
           for p in prompts]
    out = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[i] for i in ids], engine.spec_stats


def main() -> None:
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, CFG.vocab_size, 67)] for _ in range(24)]
    on_gpu = jax.default_backend() == "gpu"
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for dtype in (jnp.float32, jnp.bfloat16) if on_gpu else (jnp.float32,):
        weights = LLAMA.random_weights(CFG, jax.random.PRNGKey(1), dtype=dtype, scale=0.3)
        for impl in ("reference", "pallas"):
            plain, _ = generate(weights, prompts, impl)
            spec, stats = generate(weights, prompts, impl, truth=plain)
            same = sum(a == b for a, b in zip(plain, spec, strict=True))
            print(f"{jnp.dtype(dtype).name:8s} {impl:9s}: identical {same}/{len(plain)}; acceptance "
                  f"{stats.acceptance_rate:.2f}, tokens/step {stats.mean_tokens_per_step:.2f}", flush=True)


if __name__ == "__main__":
    main()
