"""GGUF loading: the embedded SmolLM2 against transformers' own GGUF loader, and a
tiny GGUF written here (llama.cpp's layout) against its torch source model."""
from __future__ import annotations

import functools
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_model
from checkpoints.loader import default_model_path
from helpers import prefill_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

PAGE_SIZE = 16
TOL = 1e-4


def our_logits(loaded, tokens: np.ndarray) -> np.ndarray:
    """Logits at every position of one prefill step of ``tokens``."""
    return prefill_logits(loaded.config, loaded.weights, tokens, PAGE_SIZE)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def to_our_layout(sd: dict[str, np.ndarray], cfg, i: int) -> dict[str, np.ndarray]:
    """Layer i of an HF state dict ([out, in] matrices) in LlamaWeights' layout."""
    H, N, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{i}."
    return {
        "input_norm": sd[p + "input_layernorm.weight"],
        "post_norm": sd[p + "post_attention_layernorm.weight"],
        "q_proj": sd[p + "self_attn.q_proj.weight"].T.reshape(H, N, D),
        "kv_proj": np.stack([sd[p + "self_attn.k_proj.weight"].T.reshape(H, K, D),
                             sd[p + "self_attn.v_proj.weight"].T.reshape(H, K, D)], axis=1),
        "o_proj": sd[p + "self_attn.o_proj.weight"].T.reshape(N, D, H),
        "gate_up": np.stack([sd[p + "mlp.gate_proj.weight"].T, sd[p + "mlp.up_proj.weight"].T],
                            axis=1),
        "down": sd[p + "mlp.down_proj.weight"].T,
    }


# --- the embedded SmolLM2-135M GGUF ------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """(our LoadedModel, transformers model, its f32 state dict as numpy), loaded once."""
    path = default_model_path()
    ours = load_model(path, dtype=jnp.float32, use_cache=False, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    sd = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    return ours, ref, sd


def test_smollm2_config(smollm2):
    ours, ref, _ = smollm2
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert cfg.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps)
    assert ours.tokenizer_source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ours.name == "SmolLM2-135M-Instruct.Q4_1"


def test_smollm2_weights_equal_transformers(smollm2):
    ours, _, sd = smollm2
    cfg, w = ours.config, ours.weights
    assert w.lm_head is None
    np.testing.assert_allclose(np.asarray(w.embed), sd["model.embed_tokens.weight"],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(w.final_norm), sd["model.norm.weight"],
                               rtol=1e-6, atol=1e-7)
    for i in (0, 1, cfg.num_layers - 1):
        for name, ref in to_our_layout(sd, cfg, i).items():
            np.testing.assert_allclose(np.asarray(getattr(w.layers[i], name)), ref,
                                       rtol=1e-6, atol=1e-7, err_msg=f"layer {i} {name}")


def test_smollm2_qk_unpermute(smollm2):
    """q/k rows come back in HF order; the raw GGUF order really is different."""
    ours, _, sd = smollm2
    cfg = ours.config
    reader = gguf.GGUFReader(default_model_path())
    raw = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name, heads, ours_arr in (
            ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", cfg.num_heads,
             ours.weights.layers[3].q_proj),
            ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", cfg.num_kv_heads,
             ours.weights.layers[3].kv_proj[:, 0])):
        t = raw[gguf_name]
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(reversed([int(d) for d in t.shape])))
        assert not np.allclose(stored, sd[hf_name]), "GGUF rows unexpectedly in HF order"
        ours_torch = np.asarray(ours_arr).reshape(cfg.hidden_size, -1).T
        np.testing.assert_array_equal(ours_torch, sd[hf_name])
        rows = stored.shape[0]
        # llama.cpp's forward permutation of HF rows gives back the stored rows.
        permuted = (sd[hf_name].reshape(heads, 2, rows // heads // 2, -1)
                    .swapaxes(1, 2).reshape(stored.shape))
        np.testing.assert_array_equal(permuted, stored)


def test_smollm2_logits_match_transformers(smollm2):
    ours, ref, _ = smollm2
    tokens = np.random.default_rng(0).integers(0, ours.config.vocab_size, 20)
    err = rel_err(our_logits(ours, tokens), torch_logits(ref, tokens))
    assert err <= TOL, f"relative logits error {err:.2e}"


# --- a tiny GGUF written in llama.cpp's layout --------------------------------------

def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders q/k rows (and biases) like this."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_freqs(theta, dim, factor, low, high, original) -> np.ndarray:
    """The rope_freqs tensor llama.cpp writes for Llama-3 rope scaling."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def write_llama_gguf(path, model, *, rope_freqs=None, quantize: dict | None = None) -> None:
    """Write ``model`` (an untied transformers Llama) as llama.cpp would.

    Norms and biases are stored as F32, matrices as F16 unless ``quantize`` maps
    their GGUF name to a GGML type. The torch model's parameters are replaced by
    the values the file really holds, so both sides compute with the same weights.
    """
    c = model.config
    assert not c.tie_word_embeddings
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(5)
    w.add_eos_token_id(7)
    w.add_eot_token_id(8)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    quantize = quantize or {}
    with torch.no_grad():
        for hf, p in model.named_parameters():
            if hf in names:
                name = names[hf]
            else:
                _, _, i, rest = hf.split(".", 3)
                module, kind = rest.rsplit(".", 1)
                name = f"blk.{i}.{layer_names[module]}.{kind}"
            arr = p.float().numpy().copy()
            heads_of = heads if ".attn_q." in name else kv_heads if ".attn_k." in name else None
            order = ((lambda x: x) if heads_of is None
                     else functools.partial(llama_cpp_permute, n_heads=heads_of))
            if arr.ndim == 1:
                values, data, raw = arr, order(arr), {}
            elif name in quantize:
                qtype = quantize[name]
                values = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
                data = gguf.quants.quantize(order(arr), qtype)
                raw = dict(raw_shape=data.shape, raw_dtype=qtype)
            else:
                values = arr.astype(np.float16).astype(np.float32)
                data, raw = order(arr).astype(np.float16), {}
            w.add_tensor(name, data, **raw)
            p.copy_(torch.from_numpy(np.ascontiguousarray(values).reshape(arr.shape)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama(seed: int, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512, "tie_word_embeddings": False, **overrides})
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn(p.shape) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape))
    return model.eval()


def test_tiny_gguf_matches_source_model(tmp_path):
    """Untied output, q/k/v/o and MLP biases, F16 and Q8_0 matrices, permuted q/k rows."""
    model = tiny_llama(1, attention_bias=True, mlp_bias=True)
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, model, quantize={
        "blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
        "blk.1.ffn_down.weight": gguf.GGMLQuantizationType.Q8_0,
        "output.weight": gguf.GGMLQuantizationType.Q8_0})
    loaded = load_model(str(path), dtype=jnp.float32, use_cache=False, progress=False)
    cfg = loaded.config
    assert not cfg.tie_word_embeddings and loaded.weights.lm_head is not None
    assert cfg.attention_bias and cfg.mlp_bias
    assert cfg.bos_token_id == 5 and cfg.eos_token_ids == (7, 8)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, ref in to_our_layout(sd, cfg, 0).items():
        np.testing.assert_allclose(np.asarray(getattr(loaded.weights.layers[0], name)), ref,
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 33)
    err = rel_err(our_logits(loaded, tokens), torch_logits(model, tokens))
    assert err <= TOL, f"relative logits error {err:.2e}"


def test_tiny_gguf_llama3_rope_freqs(tmp_path):
    """llama.cpp stores Llama-3 rope scaling as a rope_freqs tensor; it is recognised."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    model = tiny_llama(2, head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                       rope_parameters=rope, max_position_embeddings=131072)
    freqs = llama3_rope_freqs(10000.0, 64, 8.0, 1.0, 4.0, 8192)
    assert len(set(np.round(freqs, 3))) > 3  # all three regimes (1, smooth, factor) present
    path = tmp_path / "tiny3.gguf"
    write_llama_gguf(path, model, rope_freqs=freqs)
    loaded = load_model(str(path), dtype=jnp.float32, use_cache=False, progress=False)
    rs = loaded.config.rope_scaling
    assert (rs.rope_type, rs.factor, rs.original_max_position_embeddings) == ("llama3", 8.0, 8192)
    tokens = np.random.default_rng(2).integers(0, loaded.config.vocab_size, 120)
    ref = torch_logits(model, tokens)
    err = rel_err(our_logits(loaded, tokens), ref)
    assert err <= TOL, f"relative logits error {err:.2e}"
    # The prompt is long enough that unscaled rope would have failed this test.
    unscaled = tiny_llama(2, head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=131072)
    unscaled.load_state_dict(model.state_dict())
    assert rel_err(torch_logits(unscaled, tokens), ref) > 100 * TOL


def test_tiny_gguf_unknown_rope_freqs_rejected(tmp_path):
    from checkpoints import ConfigError

    model = tiny_llama(3)
    rng = np.random.default_rng(3)
    path = tmp_path / "odd_rope.gguf"
    write_llama_gguf(path, model, rope_freqs=(1 + rng.random(8)).astype(np.float32))
    with pytest.raises(ConfigError, match="rope_freqs"):
        load_model(str(path), dtype=jnp.float32, use_cache=False, progress=False)
