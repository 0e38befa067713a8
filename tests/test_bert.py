"""The BERT encoder against transformers' BertModel (PyTorch, f32, eager attention) on random
configs and weights: last hidden states of packed batches, CLS / mean / last pooling, packing
invariance, activations, checkpoint errors, BertForMaskedLM checkpoints, the converted cache."""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from arctic_jax.attention.bidirectional import reference_segment_attention, segment_attention
from arctic_jax.config import ConfigError
from arctic_jax.encoder_batch import build_encoder_batch
from arctic_jax.models import bert, bert_layout, bert_weights
from arctic_jax.models.bert_config import BertConfig
from arctic_jax.models.pooling import finalize, pool
from arctic_jax.models.registry import BERT
from checkpoints import CheckpointError, load_model

SEED = int(np.random.SeedSequence().entropy % (2 ** 31))  # fresh each run; printed on failure
TOL = 1e-5
NUM_TOKENS, NUM_SEQS = 64, 6       # one compiled bucket for every batch of the random model
LENGTHS = (9, 1, 23, 14)           # packed: 47 tokens, 2 empty sequence slots, 17 padding rows

HF = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
          intermediate_size=96, max_position_embeddings=40, type_vocab_size=2,
          layer_norm_eps=1e-6, hidden_act="gelu")


def randomize(model, seed: int) -> None:
    """Every parameter random (transformers zero-initialises biases and LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "LayerNorm.weight" in name else 0.1 * noise)


def torch_model(cls, seed: int, **overrides):
    cfg = transformers.BertConfig(**{**HF, **overrides})
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls)(cfg).eval()
    randomize(model, seed)
    return model


def save(model, directory) -> str:
    model.save_pretrained(str(directory))
    return str(directory)


def load(directory, **kw):
    kw.setdefault("use_cache", False)
    return load_model(str(directory), dtype=jnp.float32, progress=False, **kw)


def random_sequences(rng, lengths, cfg=HF):
    ids = [rng.integers(1, cfg["vocab_size"], n).tolist() for n in lengths]
    types = [rng.integers(0, cfg["type_vocab_size"], n).tolist() for n in lengths]
    return ids, types


def torch_hidden(model, ids, types) -> np.ndarray:
    """transformers' last hidden state of one sequence [n, H] (run alone: no padding)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types]))
    return out.last_hidden_state[0].numpy()


def batch_of(ids, types):
    return build_encoder_batch(ids, NUM_TOKENS, NUM_SEQS, token_types=types)


@functools.cache
def encode_fn(cfg: BertConfig, impl: str = "reference"):
    return jax.jit(functools.partial(bert.encode, cfg=cfg, attention_impl=impl))


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(SEED)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(torch model, loaded model, checkpoint dir) of a random 3-layer BertModel."""
    model = torch_model("BertModel", SEED)
    directory = save(model, tmp_path_factory.mktemp("bert"))
    return model, load(directory), directory


@pytest.fixture(scope="module")
def packed(base, rng):
    """A packed batch of sequences of different lengths with random token types, its hidden
    states and transformers' per-sequence hidden states."""
    model, loaded, _ = base
    ids, types = random_sequences(rng, LENGTHS)
    batch = batch_of(ids, types)
    hidden = np.asarray(encode_fn(loaded.config)(loaded.weights, batch))
    expected = [torch_hidden(model, i, t) for i, t in zip(ids, types, strict=True)]
    return batch, hidden, expected, ids, types


def rows(hidden, batch, s):
    return hidden[batch.seq_start[s]:batch.seq_start[s + 1]]


def test_config_and_weights_come_from_the_checkpoint(base):
    model, loaded, _ = base
    cfg = loaded.config
    assert loaded.spec is BERT and BERT.task == "embed"
    assert cfg == BertConfig(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4,
                             intermediate_size=96, max_position_embeddings=40, type_vocab_size=2,
                             layer_norm_eps=1e-6, hidden_act="gelu", pad_token_id=0)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w = loaded.weights.layers[1]
    q = sd["encoder.layer.1.attention.self.query.weight"]
    np.testing.assert_array_equal(w.qkv[:, 0], q.T.reshape(64, 4, 16))
    np.testing.assert_array_equal(w.qkv_bias[2], sd["encoder.layer.1.attention.self.value.bias"]
                                  .reshape(4, 16))
    np.testing.assert_array_equal(w.down, sd["encoder.layer.1.output.dense.weight"].T)


def test_packed_hidden_states_match_transformers(packed):
    batch, hidden, expected, _, _ = packed
    assert hidden.shape == (NUM_TOKENS, 64) and hidden.dtype == np.float32
    for s, ref in enumerate(expected):
        err = np.abs(rows(hidden, batch, s) - ref).max()
        assert err < TOL, f"sequence {s} (length {len(ref)}): max abs error {err} (seed {SEED})"


def test_pooling_matches_torch(packed):
    batch, hidden, expected, _, _ = packed
    S = len(expected)
    for mode, ref in (("cls", [e[0] for e in expected]), ("mean", [e.mean(0) for e in expected]),
                      ("last", [e[-1] for e in expected])):
        got = np.asarray(jax.jit(pool, static_argnums=2)(hidden, batch, mode))
        assert got.shape == (NUM_SEQS, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got[:S], np.stack(ref), atol=TOL, err_msg=f"{mode} seed {SEED}")
        np.testing.assert_array_equal(got[S:], 0.0)  # empty sequence slots
        normed = np.asarray(finalize(got, None, True))
        ref_n = np.stack(ref) / np.linalg.norm(np.stack(ref), axis=-1, keepdims=True)
        np.testing.assert_allclose(normed[:S], ref_n, atol=TOL)
        assert np.isfinite(normed).all()


def test_pooling_ignores_padding_rows_even_nan(packed):
    batch, hidden, _, _, _ = packed
    real = int(batch.seq_start[-1])
    poisoned = hidden.copy()
    poisoned[real:] = np.nan
    for mode in ("cls", "mean", "last"):
        np.testing.assert_array_equal(np.asarray(pool(poisoned, batch, mode)),
                                      np.asarray(pool(hidden, batch, mode)))


def test_packed_batch_equals_each_sequence_alone(base, packed):
    _, loaded, _ = base
    batch, hidden, _, ids, types = packed
    fn = encode_fn(loaded.config)
    for s in range(len(ids)):
        alone = batch_of([ids[s]], [types[s]])
        got = np.asarray(fn(loaded.weights, alone))[:len(ids[s])]
        np.testing.assert_allclose(got, rows(hidden, batch, s), atol=2e-6, rtol=0,
                                   err_msg=f"sequence {s}, seed {SEED}")


def test_reference_attention_keeps_to_each_sequence(rng):
    lengths = (5, 12, 3)
    ids, _ = random_sequences(rng, lengths)
    batch = build_encoder_batch(ids, 24, 4)
    q, k, v = (rng.standard_normal((24, 2, 8)).astype(np.float32) for _ in range(3))
    out = np.asarray(segment_attention(q, k, v, batch, scale=0.3))
    for s in range(len(lengths)):
        a, b = batch.seq_start[s], batch.seq_start[s + 1]
        scores = np.einsum("tnd,und->ntu", q[a:b], k[a:b]) * 0.3
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[a:b], np.einsum("ntu,und->tnd", p, v[a:b]), atol=1e-5)
    np.testing.assert_array_equal(out[batch.seq_start[-1]:], 0.0)
    with pytest.raises(ValueError, match="unknown segment attention impl 'flash'"):
        segment_attention(q, k, v, batch, scale=0.3, impl="flash")
    same = reference_segment_attention(q, k, v, batch.segment_ids, 4, scale=0.3)
    np.testing.assert_array_equal(np.asarray(same), out)


def test_pallas_attention_impl_matches_reference(base, packed):
    _, loaded, _ = base
    batch, hidden, _, _, _ = packed
    got = np.asarray(encode_fn(loaded.config, "pallas")(loaded.weights, batch))
    real = int(batch.seq_start[-1])
    np.testing.assert_allclose(got[:real], hidden[:real], atol=TOL)


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "relu"])
def test_activations_match_transformers(tmp_path, rng, act):
    model = torch_model("BertModel", SEED + 1, hidden_act=act, num_hidden_layers=1)
    loaded = load(save(model, tmp_path / act))
    assert loaded.config.hidden_act == act
    ids, types = random_sequences(rng, (11, 6))
    batch = batch_of(ids, types)
    hidden = np.asarray(encode_fn(loaded.config)(loaded.weights, batch))
    for s in range(2):
        err = np.abs(rows(hidden, batch, s) - torch_hidden(model, ids[s], types[s])).max()
        assert err < TOL, f"{act}: max abs error {err} (seed {SEED})"


def test_masked_lm_checkpoint_loads(tmp_path, rng, caplog):
    model = torch_model("BertForMaskedLM", SEED + 2, num_hidden_layers=2)
    directory = save(model, tmp_path / "mlm")
    names = load_file(os.path.join(directory, "model.safetensors")).keys()
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert "cls.predictions.transform.dense.weight" in names
    with caplog.at_level("INFO", logger="checkpoints.hf_layout"):
        loaded = load(directory)
    assert loaded.config.tensor_prefix == "bert." and "cls.predictions.bias" in caplog.text
    ids, types = random_sequences(rng, (8, 13))
    batch = batch_of(ids, types)
    hidden = np.asarray(encode_fn(loaded.config)(loaded.weights, batch))
    for s in range(2):
        ref = torch_hidden(model.bert, ids[s], types[s])
        assert np.abs(rows(hidden, batch, s) - ref).max() < TOL, f"seed {SEED}"


def test_converted_cache_round_trips_the_bert_config(base, tmp_path):
    _, loaded, directory = base
    first = load(directory, use_cache=True, cache_dir=tmp_path)
    again = load(directory, use_cache=True, cache_dir=tmp_path)
    assert not first.from_cache and again.from_cache
    assert again.config == loaded.config and isinstance(again.config, BertConfig)
    for a, b in zip(jax.tree.leaves(again.weights), jax.tree.leaves(loaded.weights), strict=True):
        np.testing.assert_array_equal(a, b)


# --- bad checkpoints ----------------------------------------------------------------------


def rewrite(src: str, dst, *, config=None, tensors=None) -> str:
    """A copy of checkpoint ``src`` with its config dict / tensor dict edited by the callables."""
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    t = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config(cfg) if config else cfg, f)
    save_file(tensors(t) if tensors else t, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_missing_tensor_is_named(base, tmp_path):
    name = "encoder.layer.2.attention.self.key.bias"

    def drop(t):
        del t[name]
        return t

    with pytest.raises(CheckpointError, match=rf"missing tensors \(1\): {name}"):
        load(rewrite(base[2], tmp_path / "m", tensors=drop))


def test_misshaped_and_unexpected_tensors_are_named(base, tmp_path):
    name = "encoder.layer.0.intermediate.dense.weight"

    def edit(t):
        t[name] = t[name][:90]
        t["encoder.layer.0.extra.weight"] = t["pooler.dense.bias"].copy()
        t["pooler.dense.bias"] = t["pooler.dense.bias"][:5]
        return t

    with pytest.raises(CheckpointError) as e:
        load(rewrite(base[2], tmp_path / "m", tensors=edit))
    msg = str(e.value)
    assert f"tensor {name}: expected shape (96, 64), found (90, 64)" in msg
    assert "tensor pooler.dense.bias: expected shape (64,), found (5,)" in msg
    assert "unexpected tensors (1): encoder.layer.0.extra.weight" in msg


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "num_attention_heads": 5}, "hidden_size .64. is not a multiple of "
                                                "num_attention_heads .5."),
    (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}, "'num_hidden_layers'"),
    (lambda c: {**c, "hidden_act": "silu"}, "unsupported hidden_act 'silu'"),
    (lambda c: {**c, "position_embedding_type": "relative_key"},
     "unsupported position_embedding_type 'relative_key'"),
    (lambda c: {**c, "is_decoder": True}, "is_decoder"),
    (lambda c: {**c, "type_vocab_size": 0}, "type_vocab_size must be a positive integer"),
])
def test_bad_config_is_named(base, tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load(rewrite(base[2], tmp_path / "m", config=edit))


def test_bert_has_no_gguf_and_no_lm_head(base):
    _, loaded, _ = base
    with pytest.raises(ConfigError, match="GGUF files of BERT models are not supported"):
        bert_layout.LAYOUT.hf_name_of_gguf("token_embd.weight")
    with pytest.raises(ConfigError, match="embedding model"):
        BERT.head(loaded.weights, None, cfg=loaded.config)


def test_llm_engine_refuses_an_embedding_model(base):
    from arctic_jax.engine.engine import LLMEngine

    _, loaded, _ = base
    with pytest.raises(ConfigError, match="'bert' is an embedding model; use arctic_jax.Embedder"):
        LLMEngine(loaded.spec, loaded.config, loaded.weights, tokenizer=None)


def test_random_and_validated_weights(base):
    cfg = base[1].config
    w = bert_weights.random_weights(cfg, jax.random.key(SEED), dtype=jnp.bfloat16)
    bert_weights.validate_weights(w, cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(w))
    bad = dataclasses.replace(w.layers[0], up=w.layers[0].up[:, :5])
    wrong = dataclasses.replace(w, layers=(bad,) + w.layers[1:])
    with pytest.raises(ValueError, match=r"layers\[0\]\.up: shape \(64, 5\), expected \(64, 96\)"):
        bert_weights.validate_weights(wrong, cfg)
    # bf16 weights run (float32 LayerNorm / residuals) close to the f32 model on the same weights.
    ids, types = random_sequences(np.random.default_rng(SEED), (12, 5))
    batch = batch_of(ids, types)
    w32 = jax.tree.map(lambda x: x.astype(jnp.float32), w)
    lo = np.asarray(encode_fn(cfg)(w, batch)).astype(np.float32)[:17]
    hi = np.asarray(encode_fn(cfg)(w32, batch))[:17]
    assert lo.dtype == np.float32 and np.abs(lo - hi).max() < 0.1
