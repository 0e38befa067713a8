"""Logits parity with transformers' LlamaForCausalLM (f32) for HF checkpoints loaded by us."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from arctic_jax.config import ModelConfig
from checkpoints import load_model
from helpers import prefill_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAGE_SIZE = 16
TOL = 1e-4

BASE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
            max_position_embeddings=512, tie_word_embeddings=False)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

CASES = {
    # name: (config overrides, prompt length)
    "gqa1_untied": (dict(), 37),
    "gqa3_tied": (dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                       tie_word_embeddings=True), 29),
    "gqa4_llama3_rope": (dict(num_attention_heads=4, num_key_value_heads=1,
                              rope_parameters=LLAMA3_ROPE), 140),
    "linear_rope": (dict(num_key_value_heads=2,
                         rope_parameters={"rope_type": "linear", "rope_theta": 5000.0,
                                          "factor": 2.5}), 70),
    "odd_hidden": (dict(vocab_size=97, hidden_size=72, intermediate_size=100,
                        num_attention_heads=3, num_key_value_heads=1), 23),
    "explicit_head_dim": (dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=12, tie_word_embeddings=True), 19),
    "biases": (dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True), 31),
}


def randomized_llama(overrides: dict, seed: int):
    """A transformers LlamaForCausalLM with every parameter (norms, biases too) random."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            else:
                p.copy_(0.1 * torch.randn(p.shape))
    return model.eval()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].float().numpy()


def our_logits(loaded, tokens: np.ndarray) -> np.ndarray:
    """Logits at every position of one prefill step of ``tokens``."""
    return prefill_logits(loaded.config, loaded.weights, tokens, PAGE_SIZE)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def check_parity(model, directory, n_tokens: int, seed: int, **load_kwargs):
    loaded = load_model(str(directory), dtype=jnp.float32, use_cache=False, progress=False,
                        **load_kwargs)
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, n_tokens)
    ref = torch_logits(model, tokens)
    err = rel_err(our_logits(loaded, tokens), ref)
    assert err <= TOL, f"relative logits error {err:.2e} > {TOL}"
    return loaded


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    overrides, n_tokens = CASES[case]
    seed = sorted(CASES).index(case)
    model = randomized_llama(overrides, seed)
    model.save_pretrained(tmp_path)
    loaded = check_parity(model, tmp_path, n_tokens, seed)
    cfg = loaded.config
    assert cfg.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    assert (loaded.weights.lm_head is None) == cfg.tie_word_embeddings
    assert cfg.num_heads // cfg.num_kv_heads == (
        model.config.num_attention_heads // model.config.num_key_value_heads)
    assert loaded.tokenizer_source.path == str(tmp_path)
    assert loaded.tokenizer_source.gguf_file is None
    assert loaded.weights.embed.dtype == jnp.float32


def read_config(directory) -> dict:
    with open(directory / "config.json") as f:
        return json.load(f)


def write_config(directory, d: dict) -> None:
    with open(directory / "config.json", "w") as f:
        json.dump(d, f)


def test_llama3_scaling_matters(tmp_path):
    """The llama3 case would fail without scaling: guards against a vacuous rope test."""
    overrides, n_tokens = CASES["gqa4_llama3_rope"]
    model = randomized_llama(overrides, 11)
    model.save_pretrained(tmp_path)
    d = read_config(tmp_path)
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    write_config(tmp_path, d)
    loaded = load_model(str(tmp_path), dtype=jnp.float32, use_cache=False, progress=False)
    tokens = np.random.default_rng(11).integers(0, model.config.vocab_size, n_tokens)
    assert rel_err(our_logits(loaded, tokens), torch_logits(model, tokens)) > 1e-2


def test_sharded_checkpoint(tmp_path):
    model = randomized_llama(dict(num_key_value_heads=2), 21)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path)
    check_parity(model, tmp_path, 25, 21)


def test_transformers4_style_config_file(tmp_path):
    """A config.json with top-level rope_theta / rope_scaling (transformers 4) loads right."""
    overrides, n_tokens = CASES["gqa4_llama3_rope"]
    model = randomized_llama(overrides, 31)
    model.save_pretrained(tmp_path)
    d = read_config(tmp_path)
    rope = d.pop("rope_parameters")
    assert rope["rope_type"] == "llama3"
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    write_config(tmp_path, d)
    loaded = check_parity(model, tmp_path, n_tokens, 31)
    assert loaded.config.rope_scaling.rope_type == "llama3"
    assert loaded.config.rope_scaling.original_max_position_embeddings == 64


def test_config_styles_from_hf_dict():
    common = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128,
                  hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    t4 = ModelConfig.from_hf_dict({**common, "rope_theta": 500000.0,
                                   "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert t4.rope_theta == 500000.0
    assert (t4.rope_scaling.rope_type, t4.rope_scaling.factor) == ("linear", 4.0)
    t4_llama3 = ModelConfig.from_hf_dict({**common, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    t5_llama3 = ModelConfig.from_hf_dict({**common, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert t4_llama3 == t5_llama3
    assert t5_llama3.rope_scaling.rope_type == "llama3" and t5_llama3.rope_theta == 500000.0
    plain_t4 = ModelConfig.from_hf_dict({**common, "rope_theta": 1234.0})
    plain_t5 = ModelConfig.from_hf_dict({**common, "rope_parameters": {
        "rope_theta": 1234.0, "rope_type": "default"}})
    assert plain_t4 == plain_t5 and plain_t4.rope_scaling.rope_type == "default"
    assert plain_t4.head_dim == 8 and plain_t4.num_kv_heads == 2
