"""The engine's device programs, lowered for CUDA, hold no data-dependent control flow.

On a GPU, XLA runs a conditional or a while loop by copying its predicate to the
host and waiting for it, so the thread that launches the step blocks until the
device reaches that point. The engine overlaps building step n+1 with running
step n; a branch inside a step would silently serialise them. The sampler's
modes are chosen on the host for that reason. (Lowering for CUDA works without a
GPU; the reference attention is used, since the Pallas kernels lower to single
custom calls on a GPU but to interpreted loops here.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from arctic_jax.config import ModelConfig
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.engine.packing import pack
from arctic_jax.models.llama_weights import random_weights
from arctic_jax.models.registry import LLAMA
from arctic_jax.sampling import SamplingMode

CFG = ModelConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=256, eos_token_ids=())
CONTROL_FLOW = ("stablehlo.while", "stablehlo.case", "stablehlo.if")


class _Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


@pytest.fixture(scope="module")
def runner():
    weights = random_weights(CFG, jax.random.PRNGKey(3))
    engine = LLMEngine(LLAMA, CFG, weights, _Tok(), EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, page_size=8, num_pages=40,
        token_buckets=(32,), page_buckets=(16,), max_logprobs=2, attention_impl="reference"))
    return engine.runner


def _control_flow(lowered_text: str) -> dict[str, int]:
    return {op: lowered_text.count(op) for op in CONTROL_FLOW if op in lowered_text}


@pytest.mark.parametrize("contiguous", [False, True])
def test_model_program_has_no_control_flow_on_cuda(runner, contiguous):
    inputs = runner.inputs.dummy(32, 16)
    flat, layout = pack(inputs.model)
    traced = runner._programs["single", contiguous].trace(runner.weights["single"], runner.cache,
                                                          runner.token_buffer, flat, layout)
    assert _control_flow(traced.lower(lowering_platforms=("cuda",)).as_text()) == {}


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("mode", list(SamplingMode))
def test_sampler_programs_have_no_control_flow_on_cuda(runner, mode, verify):
    """Every sampler, the rejection-sampling verify variants included."""
    from arctic_jax.engine.programs import jit_sampler_step

    inputs = runner.inputs.dummy(32, 16, verify=verify)
    flat, layout = pack(inputs.sampler)
    logits = jax.random.normal(jax.random.PRNGKey(0), (8, CFG.vocab_size), jnp.float32)
    program = jit_sampler_step(mode, runner.num_top_logprobs, verify)
    draft_q = jnp.zeros((16, CFG.vocab_size), jnp.float32) if verify else None  # a draft model's q
    traced = program.trace(logits, runner.token_buffer, draft_q, flat, layout)
    assert _control_flow(traced.lower(lowering_platforms=("cuda",)).as_text()) == {}


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("mode", list(SamplingMode))
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_draft_programs_have_no_control_flow_on_cuda(runner, mode, verify, kind):
    """The draft model's program (Arctic's speculator), every sampling mode."""
    from arctic_jax.engine.programs import jit_draft_program
    from arctic_jax.speculative import draft_model as dm

    cfg = dm.DraftModelConfig(kind, 3, CFG.vocab_size, CFG.hidden_size, 16, tie_weights=kind == "lstm")
    weights = dm.random_weights(cfg, jax.random.PRNGKey(1))
    inputs = runner.inputs.dummy(32, 16, draft_mode=mode)
    flat, layout = pack(inputs.draft)
    cols = 2 + 2 * runner.num_top_logprobs + verify
    program = jit_draft_program(cfg, 3, mode, 4, cols - 1 if verify else None)
    traced = program.trace(weights, jnp.ones((8, CFG.hidden_size)), jnp.zeros((8, cols), jnp.int32),
                           jnp.zeros((8 * 3, CFG.vocab_size)), flat, layout)
    assert _control_flow(traced.lower(lowering_platforms=("cuda",)).as_text()) == {}


def test_the_check_sees_a_device_side_branch():
    """The same check flags a lax.cond (so the tests above can fail)."""
    f = jax.jit(lambda x: jax.lax.cond(x.sum() > 0, lambda: x * 2, lambda: x))
    text = f.trace(jnp.ones(4)).lower(lowering_platforms=("cuda",)).as_text()
    assert _control_flow(text)


def test_contiguous_prefill_default_follows_cudnn_support():
    """On by default only where cuDNN takes the inputs; an explicit value always wins."""
    from arctic_jax.attention.dispatch import cudnn_attention_supported
    from arctic_jax.engine.engine import DEFAULT_CONTIGUOUS_PREFILL_MIN_TOKENS, resolve_contiguous_prefill

    auto, explicit = EngineConfig(), EngineConfig(contiguous_prefill_min_tokens=64)
    on_gpu = jax.default_backend() == "gpu"
    assert resolve_contiguous_prefill(auto, "pallas", jnp.bfloat16, 128) == (
        DEFAULT_CONTIGUOUS_PREFILL_MIN_TOKENS if on_gpu else 0)
    for dtype, head_dim, impl in ((jnp.float32, 128, "pallas"), (jnp.bfloat16, 256, "pallas"),
                                  (jnp.bfloat16, 128, "reference")):
        assert resolve_contiguous_prefill(auto, impl, dtype, head_dim) == 0
        assert resolve_contiguous_prefill(explicit, impl, dtype, head_dim) == 64
    assert not cudnn_attention_supported(jnp.float32, 64)
    with pytest.raises(ValueError, match="contiguous_prefill_min_tokens"):
        EngineConfig(contiguous_prefill_min_tokens=-1)
