"""Checkpoint loading errors, dtype handling and the converted-weights cache.

Checkpoints here are written with numpy only (tiny, random) so that each
bad-file case is one small edit of a valid file.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from arctic_jax import cache_root
from checkpoints import (
    CheckpointError,
    ConfigError,
    converted_cache,
    gguf_file,
    hf_safetensors,
    load_model,
    loader,
)

CFG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32,
           hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
           tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4})


def hf_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors of an HF Llama checkpoint for ``cfg`` ([out, in] matrices)."""
    rng = np.random.default_rng(seed)
    V, H, I = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    N, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = H // N
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, H)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (N * D, H), p + "self_attn.k_proj.weight": (K * D, H),
            p + "self_attn.v_proj.weight": (K * D, H), p + "self_attn.o_proj.weight": (H, N * D),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I)})
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def write_hf(directory, cfg: dict, tensors: dict[str, np.ndarray]) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return str(directory)


def load(path, **kw):
    kw.setdefault("use_cache", False)
    return load_model(str(path), dtype=kw.pop("dtype", jnp.float32), progress=False, **kw)


@pytest.fixture
def tensors():
    return hf_tensors(CFG)


def test_valid_checkpoint_loads_in_our_layout(tmp_path, tensors):
    m = load(write_hf(tmp_path / "m", CFG, tensors))
    w, cfg = m.weights, m.config
    assert m.name == "m" and not m.from_cache
    np.testing.assert_array_equal(w.embed, tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(w.lm_head, tensors["lm_head.weight"].T)
    k = tensors["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(w.layers[1].kv_proj[:, 0], k.T.reshape(16, 2, 4))
    o = tensors["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(w.layers[1].o_proj, o.T.reshape(4, 4, 16))
    assert cfg.num_layers == 2 and w.layers[0].q_proj.shape == (16, 4, 4)


def test_bfloat16_and_default_dtype(tmp_path, tensors):
    d = write_hf(tmp_path / "m", CFG, tensors)
    m = load(d, dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(m.weights))
    ref = jnp.asarray(tensors["model.layers.0.mlp.down_proj.weight"].T).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(m.weights.layers[0].down), np.asarray(ref))
    assert loader.default_dtype() == (jnp.bfloat16 if jax.default_backend() == "gpu"
                                      else jnp.float32)
    with pytest.raises(CheckpointError, match="floating"):
        load(d, dtype=jnp.int32)


def test_missing_tensor(tmp_path, tensors):
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj"):
        load(write_hf(tmp_path / "m", CFG, tensors))


def test_wrong_shape_names_both_shapes(tmp_path, tensors):
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.ones((16, 15), np.float32)
    with pytest.raises(CheckpointError) as e:
        load(write_hf(tmp_path / "m", CFG, tensors))
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.weight" in msg
    assert "expected shape (16, 16), found (16, 15)" in msg


def test_extra_tensor(tmp_path, tensors):
    tensors["model.layers.0.self_attn.extra.weight"] = np.ones((2,), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*self_attn\.extra\.weight"):
        load(write_hf(tmp_path / "m", CFG, tensors))


def test_rotary_inv_freq_buffers_ignored(tmp_path, tensors):
    plain = load(write_hf(tmp_path / "plain", CFG, tensors))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((2,), np.float32)
    tensors["model.rotary_emb.inv_freq"] = np.ones((2,), np.float32)
    with_buffers = load(write_hf(tmp_path / "m", CFG, tensors))
    assert trees_equal(plain.weights, with_buffers.weights)


def test_tied_config_lm_head_must_equal_embedding(tmp_path):
    cfg = {**CFG, "tie_word_embeddings": True}
    t = hf_tensors(cfg)
    m = load(write_hf(tmp_path / "a", cfg, t))
    assert m.weights.lm_head is None
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    assert load(write_hf(tmp_path / "b", cfg, t)).weights.lm_head is None
    t["lm_head.weight"][3, 4] += 1.0
    with pytest.raises(CheckpointError, match="differs from model.embed_tokens.weight"):
        load(write_hf(tmp_path / "c", cfg, t))


def test_non_float_tensor(tmp_path, tensors):
    tensors["model.norm.weight"] = np.ones((16,), np.int32)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*I32"):
        load(write_hf(tmp_path / "m", CFG, tensors))


@pytest.mark.parametrize("changes, pattern", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "MistralForCausalLM"),
    (dict(architectures=None, model_type="gpt2"), "gpt2"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "yarn"),
])
def test_unsupported_config(tmp_path, tensors, changes, pattern):
    d = write_hf(tmp_path / "m", {**CFG, **changes}, tensors)
    with pytest.raises(ConfigError, match=pattern) as e:
        load(d)
    assert os.path.join(d, "config.json") in str(e.value)


def test_truncated_safetensors_names_file(tmp_path, tensors):
    d = write_hf(tmp_path / "m", CFG, tensors)
    path = os.path.join(d, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="truncated") as e:
        load(d)
    assert path in str(e.value)


def test_missing_shard_and_missing_weights(tmp_path, tensors):
    d = write_hf(tmp_path / "m", CFG, tensors)
    os.rename(os.path.join(d, "model.safetensors"),
              os.path.join(d, "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {
        n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(tensors)}}
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load(d)
    os.remove(os.path.join(d, "model.safetensors.index.json"))
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load(d)


def test_nonexistent_and_unrecognised_paths(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(CheckpointError, match=str(missing)):
        load(missing)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="neither a directory"):
        load(other)


def test_default_source_is_embedded_smollm2(monkeypatch):
    path = loader.default_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    calls = []

    def fake_load_gguf(p, dtype, progress=True):
        calls.append(p)
        from arctic_jax.config import ModelConfig
        from arctic_jax.models.registry import LLAMA
        cfg = ModelConfig.from_hf_dict(CFG)
        shapes = converted_cache.abstract_weights(LLAMA, cfg, dtype)
        return cfg, jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes)

    monkeypatch.setattr(gguf_file, "load_gguf", fake_load_gguf)
    for source in (None, "default"):
        m = load_model(source, use_cache=False)
        assert m.tokenizer_source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert calls == [path, path]


# --- GGUF ---------------------------------------------------------------------------

def write_gguf(path, arch: str = "llama", drop: tuple[str, ...] = ()) -> str:
    """A tiny f32 GGUF of CFG's shapes (rows in any order: only loading is checked)."""
    import gguf

    t = hf_tensors(CFG, seed=5)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(16)
    w.add_feed_forward_length(24)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1e4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(32)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        names.update({p + "input_layernorm.weight": f"blk.{i}.attn_norm.weight",
                      p + "post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
                      p + "self_attn.q_proj.weight": f"blk.{i}.attn_q.weight",
                      p + "self_attn.k_proj.weight": f"blk.{i}.attn_k.weight",
                      p + "self_attn.v_proj.weight": f"blk.{i}.attn_v.weight",
                      p + "self_attn.o_proj.weight": f"blk.{i}.attn_output.weight",
                      p + "mlp.gate_proj.weight": f"blk.{i}.ffn_gate.weight",
                      p + "mlp.up_proj.weight": f"blk.{i}.ffn_up.weight",
                      p + "mlp.down_proj.weight": f"blk.{i}.ffn_down.weight"})
    for hf, arr in t.items():
        if names[hf] not in drop:
            w.add_tensor(names[hf], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_valid_then_truncated(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    m = load(path)
    assert m.config.num_layers == 2 and m.weights.lm_head is not None
    assert m.tokenizer_source.path == str(tmp_path) and m.name == "tiny"
    size = os.path.getsize(path)
    for keep in (size - 64, 40):
        os.truncate(path, keep)
        with pytest.raises(CheckpointError, match="truncated") as e:
            load(path)
        assert path in str(e.value)


def test_gguf_unknown_architecture(tmp_path):
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'"):
        load(write_gguf(tmp_path / "g.gguf", arch="gpt2"))


def test_gguf_missing_tensor_uses_gguf_name(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing tensors.*blk\.1\.ffn_up\.weight"):
        load(write_gguf(tmp_path / "g.gguf", drop=("blk.1.ffn_up.weight",)))


# --- converted-weights cache --------------------------------------------------------

def trees_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb, strict=True)))


def no_conversion(*args, **kwargs):
    raise AssertionError("conversion ran although the cache should have been used")


def test_cache_second_load_skips_conversion(tmp_path, tensors, monkeypatch):
    d = write_hf(tmp_path / "m", CFG, tensors)
    cache = tmp_path / "cache"
    first = load(d, use_cache=True, cache_dir=cache, dtype="bfloat16")
    assert not first.from_cache
    assert len(os.listdir(cache)) == 1
    with monkeypatch.context() as mp:
        mp.setattr(hf_safetensors, "load_hf_checkpoint", no_conversion)
        second = load(d, use_cache=True, cache_dir=cache, dtype="bfloat16")
    assert second.from_cache and second.config == first.config
    assert trees_equal(first.weights, second.weights)
    # Another dtype is another entry; an edited source file misses the cache.
    assert not load(d, use_cache=True, cache_dir=cache).from_cache
    assert len(os.listdir(cache)) == 2
    st = os.stat(os.path.join(d, "model.safetensors"))
    os.utime(os.path.join(d, "model.safetensors"), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not load(d, use_cache=True, cache_dir=cache).from_cache


def test_cache_restores_onto_the_default_device(tmp_path, tensors):
    """A data-parallel replica built under jax.default_device(d) must load its cached
    weights onto d, not onto device 0 (which holds another replica)."""
    d = write_hf(tmp_path / "m", CFG, tensors)
    cache = tmp_path / "cache"
    load(d, use_cache=True, cache_dir=cache)
    device = jax.devices()[1]
    with jax.default_device(device):
        again = load(d, use_cache=True, cache_dir=cache)
    assert again.from_cache
    assert {x.sharding.device_set.pop() for x in jax.tree.leaves(again.weights)} == {device}


def test_cache_gguf_and_env_var(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv(cache_root.ENV_VAR, str(tmp_path / "envcache"))
    first = load(path, use_cache=True)
    monkeypatch.setattr(gguf_file, "load_gguf", no_conversion)
    # a warm start reads neither the tensors nor the metadata (seconds for a real GGUF)
    monkeypatch.setattr(gguf_file, "read_gguf_spec", no_conversion)
    second = load(path, use_cache=True)
    assert second.from_cache and trees_equal(first.weights, second.weights)
    assert second.config == first.config
    assert len(os.listdir(tmp_path / "envcache" / "converted")) == 1


@pytest.mark.parametrize("damage", ["delete_weights_file", "bad_config_json", "no_entry_file"])
def test_corrupt_cache_entry_is_reported_and_rebuilt(tmp_path, tensors, damage):
    d = write_hf(tmp_path / "m", CFG, tensors)
    cache = tmp_path / "cache"
    first = load(d, use_cache=True, cache_dir=cache)
    (entry,) = [cache / e for e in os.listdir(cache)]
    if damage == "delete_weights_file":
        files = [os.path.join(r, f) for r, _, fs in os.walk(entry / "weights") for f in fs]
        for f in files:
            if os.path.basename(os.path.dirname(f)) == "d":  # orbax array data
                os.remove(f)
    elif damage == "bad_config_json":
        (entry / "model_config.json").write_text("{ not json")
    else:
        os.remove(entry / "entry.json")
    with pytest.warns(converted_cache.CacheCorruptWarning, match=str(entry)):
        rebuilt = load(d, use_cache=True, cache_dir=cache)
    assert not rebuilt.from_cache and trees_equal(first.weights, rebuilt.weights)
    again = load(d, use_cache=True, cache_dir=cache)
    assert again.from_cache and trees_equal(first.weights, again.weights)


def test_config_json_round_trip():
    from arctic_jax.config import llama_3_1_8b

    cfg = llama_3_1_8b()
    assert converted_cache.config_from_dict(
        json.loads(json.dumps(converted_cache.config_to_dict(cfg)))) == cfg
