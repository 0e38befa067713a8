"""The model registry, spec-driven checkpoint loading and model-agnostic head placement."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.batch import Buckets, SequenceChunk, build_step_batch
from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.kv_cache import KVCache
from arctic_jax.models import llama, registry
from arctic_jax.models.registry import (
    BERT,
    LLAMA,
    SWIFTKV,
    register,
    registered_specs,
    spec_by_name,
    spec_for_hf_config,
    unregister,
)
from arctic_jax.pytree import pytree_dataclass
from checkpoints import load_model
from oracles import llama_forward_dense, rel_err
from sharding import logical_axes as ax
from sharding.placement import place_weights, placed_config, plan_heads
from test_checkpoints import CFG, hf_tensors, write_gguf, write_hf

# --- resolving a spec ------------------------------------------------------------------


def test_llama_resolves_by_architecture_and_by_model_type():
    assert spec_for_hf_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}) is LLAMA
    assert spec_for_hf_config({"architectures": ["LlamaForCausalLM"]}) is LLAMA
    assert spec_for_hf_config({"model_type": "llama"}) is LLAMA
    assert spec_for_hf_config({"architectures": None, "model_type": "llama"}) is LLAMA
    assert spec_by_name("llama") is LLAMA and LLAMA in registered_specs()
    assert LLAMA.step is llama.step and LLAMA.head is llama.head


@pytest.mark.parametrize("d, named", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
    ({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama"},
     "LlamaForSequenceClassification"),
    ({"model_type": "gpt2"}, "'gpt2'"),
    ({}, "None"),
])
def test_unregistered_config_lists_registered_architectures(d, named):
    with pytest.raises(ConfigError) as e:
        spec_for_hf_config(d)
    msg = str(e.value)
    assert named in msg and "registered architectures: LlamaForCausalLM" in msg


def test_model_type_contradicting_architecture_is_rejected():
    with pytest.raises(ConfigError, match="model_type 'mistral' does not match"):
        spec_for_hf_config({"architectures": ["LlamaForCausalLM"], "model_type": "mistral"})


def test_unknown_name():
    with pytest.raises(ConfigError, match="unknown model 'nope'; registered: llama, llama_swiftkv"):
        spec_by_name("nope")


def test_register_and_unregister():
    toy = dataclasses.replace(LLAMA, name="toy", architectures=("ToyForCausalLM",),
                              model_types=("toy",))
    register(toy)
    try:
        assert spec_for_hf_config({"architectures": ["ToyForCausalLM"]}) is toy
        assert spec_for_hf_config({"model_type": "toy"}) is toy
        assert spec_for_hf_config({"model_type": "llama"}) is LLAMA
        with pytest.raises(ValueError, match="ToyForCausalLM already registered by model 'toy'"):
            register(dataclasses.replace(toy, name="toy2", model_types=("toy2",)))
        with pytest.raises(ConfigError, match="BertModel, BertForMaskedLM, ToyForCausalLM"):
            spec_for_hf_config({"architectures": ["GPT2LMHeadModel"]})
    finally:
        unregister("toy")
    assert registered_specs() == (LLAMA, SWIFTKV, BERT)
    with pytest.raises(ConfigError, match="ToyForCausalLM"):
        spec_for_hf_config({"architectures": ["ToyForCausalLM"]})


# --- loading through the spec ----------------------------------------------------------


def test_hf_and_gguf_loads_carry_the_llama_spec(tmp_path):
    directory = write_hf(tmp_path / "m", CFG, hf_tensors(CFG))
    hf = load_model(directory, dtype=jnp.float32, use_cache=False, progress=False)
    gg = load_model(write_gguf(tmp_path / "g.gguf"), dtype=jnp.float32, use_cache=False,
                    progress=False)
    for m in (hf, gg):
        assert m.spec is LLAMA and m.spec.name == "llama"
        assert isinstance(m.weights, LLAMA.weights_class)
    # Through the cache too: the entry records the model and restores its weights class.
    cached = [load_model(directory, dtype=jnp.float32, cache_dir=tmp_path / "cache",
                         progress=False) for _ in range(2)]
    assert [m.from_cache for m in cached] == [False, True]
    assert cached[1].spec is LLAMA and isinstance(cached[1].weights, LLAMA.weights_class)


def test_gguf_unregistered_architecture_lists_registered(tmp_path):
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'; supported: llama"):
        load_model(write_gguf(tmp_path / "g.gguf", arch="gpt2"), use_cache=False, progress=False)


# --- the spec's step and head ----------------------------------------------------------

TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True)


def numpy_weights(spec, cfg: ModelConfig, seed: int, scale: float = 0.3):
    """Weights of ``spec``'s tree for ``cfg`` drawn with numpy (no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(spec.random_weights, cfg), jax.random.key(0))
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes)


def test_spec_step_then_head_equals_llama_forward():
    spec = spec_by_name("llama")
    weights = numpy_weights(spec, TINY, seed=4)
    spec.validate_weights(weights, TINY)
    tokens = np.random.default_rng(4).integers(0, TINY.vocab_size, size=11)
    page_size, pages = 4, 3
    buckets = Buckets.for_limits(max_tokens=len(tokens), max_seqs=1, max_pages_per_seq=pages)
    chunk = SequenceChunk(tokens=[int(t) for t in tokens], start=0, pages=[2, 0, 1],
                          logits_at=list(range(len(tokens))))
    batch, rows = build_step_batch([chunk], page_size, buckets)

    def cache() -> KVCache:
        return KVCache.allocate(TINY, num_pages=pages, page_size=page_size, dtype=jnp.float32)

    @jax.jit
    def via_spec(w, kv, b):
        hidden, kv = spec.step(w, kv, b, cfg=TINY)
        return spec.head(w, hidden, cfg=TINY), hidden, kv

    logits, hidden, kv_spec = via_spec(weights, cache(), batch)
    ref, kv_ref = jax.jit(functools.partial(llama.forward, cfg=TINY))(weights, cache(), batch)
    assert hidden.shape[1] == TINY.hidden_size and logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))
    for a, b in zip(jax.tree.leaves(kv_spec), jax.tree.leaves(kv_ref), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dense = llama_forward_dense(weights, TINY, tokens)
    assert rel_err(np.asarray(logits)[:rows], dense) < 1e-5


# --- model-agnostic head placement -----------------------------------------------------


def hand_placed_llama(w, cfg: ModelConfig, plan):
    """The Llama placement written out by hand: q heads taken by q_source (zero where -1),
    KV heads repeated kv_replication times, every other array unchanged."""
    q_idx = np.asarray([max(s, 0) for s in plan.q_source])
    q_keep = jnp.asarray([s >= 0 for s in plan.q_source], jnp.float32)
    kv_idx = np.repeat(np.arange(cfg.num_kv_heads), plan.kv_replication)
    layers = []
    for lw in w.layers:
        layers.append(dataclasses.replace(
            lw,
            q_proj=lw.q_proj[:, q_idx, :] * q_keep[None, :, None],
            o_proj=lw.o_proj[q_idx, :, :] * q_keep[:, None, None],
            kv_proj=lw.kv_proj[:, :, kv_idx, :],
            q_bias=lw.q_bias[q_idx, :] * q_keep[:, None],
            kv_bias=lw.kv_bias[:, kv_idx, :]))
    return dataclasses.replace(w, layers=tuple(layers))


@pytest.mark.parametrize("heads, kv_heads, devices", [(6, 2, 4), (8, 2, 8), (4, 4, 8)])
def test_place_weights_matches_hand_written_llama_placement(heads, kv_heads, devices):
    cfg = dataclasses.replace(TINY, num_heads=heads, num_kv_heads=kv_heads, mlp_bias=True,
                              tie_word_embeddings=heads == 8)
    w = numpy_weights(LLAMA, cfg, seed=heads * 10 + devices)
    plan = plan_heads(cfg, devices)
    assert plan.changes_model
    placed = place_weights(w, cfg, plan)
    want = hand_placed_llama(w, cfg, plan)
    assert jax.tree.structure(placed) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    LLAMA.validate_weights(placed, placed_config(cfg, plan))


@pytree_dataclass
class ToyBlock:
    kv: jax.Array = dataclasses.field(metadata={"axes": (ax.KV_HEADS, ax.HEAD_DIM)})
    mixed: jax.Array = dataclasses.field(metadata={"axes": (ax.KV_HEADS, ax.EMBED, ax.Q_HEADS)})


@pytree_dataclass
class ToyWeights:
    norm: jax.Array = dataclasses.field(metadata={"axes": (ax.EMBED,)})
    q: jax.Array = dataclasses.field(metadata={"axes": (ax.EMBED, ax.HEAD_DIM, ax.Q_HEADS)})
    blocks: tuple[ToyBlock, ...] = ()
    extra: jax.Array | None = dataclasses.field(default=None, metadata={"axes": (ax.Q_HEADS,)})


def test_place_weights_is_generic_over_declared_axes():
    cfg = dataclasses.replace(TINY, num_heads=6, num_kv_heads=2)
    plan = plan_heads(cfg, 4)   # kv x2, q_source (0, 1, 2, -1, 3, 4, 5, -1)
    assert plan.q_source == (0, 1, 2, -1, 3, 4, 5, -1)
    rng = np.random.default_rng(0)

    def r(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    w = ToyWeights(norm=r(5), q=r(5, 3, 6), blocks=(ToyBlock(kv=r(2, 3), mixed=r(2, 5, 6)),) * 2)
    placed = place_weights(w, cfg, plan)
    q_idx, keep = np.array([0, 1, 2, 0, 3, 4, 5, 0]), np.array([1, 1, 1, 0, 1, 1, 1, 0], np.float32)
    kv_idx = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(placed.norm, w.norm)
    np.testing.assert_array_equal(placed.q, np.asarray(w.q)[:, :, q_idx] * keep)
    assert placed.extra is None and len(placed.blocks) == 2
    for blk, orig in zip(placed.blocks, w.blocks, strict=True):
        np.testing.assert_array_equal(blk.kv, np.asarray(orig.kv)[kv_idx])
        np.testing.assert_array_equal(blk.mixed, np.asarray(orig.mixed)[kv_idx][:, :, q_idx] * keep)

    bad = dataclasses.replace(w, q=r(5, 3, 4))   # 4 q heads, the config has 6
    with pytest.raises(ValueError, match=r"ToyWeights\.q: q_heads axis 2 .* 4 heads, the config has 6"):
        place_weights(bad, cfg, plan)


def test_registry_module_is_explicit():
    """The table is a plain module attribute a test can inspect (no hidden state)."""
    assert registry._SPECS == {"llama": LLAMA, "llama_swiftkv": SWIFTKV, "bert": BERT}
