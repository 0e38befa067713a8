"""FP8 (E4M3) matmuls against a numpy oracle (ml_dtypes' float8_e4m3fn, float64 sums), and the
FP8 BERT encoder against its float32 self (random configs) and sentence-transformers (the
embedded all-MiniLM-L6-v2)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from arctic_jax.config import ConfigError
from arctic_jax.encoder_batch import build_encoder_batch
from arctic_jax.engine.embedding_config import EmbeddingEngineConfig
from arctic_jax.models import bert, bert_weights
from arctic_jax.models.bert_config import BertConfig
from arctic_jax.models.fp8 import FP8, Fp8Weight, dense, fp8_matmul, quantize_weight
from helpers import cosine

SEED = int(np.random.SeedSequence().entropy % (2 ** 31))  # fresh each run; printed on failure


def oracle(x: np.ndarray, w: np.ndarray, contract: int) -> np.ndarray:
    """x [T, *K] . w [*K, *O] with per-row / per-column E4M3 scales, as the module docstring
    states it: numpy, ml_dtypes rounding, float64 sums."""
    t = x.shape[0]
    x2 = x.reshape(t, -1).astype(np.float32)
    w2 = w.reshape(x2.shape[1], -1).astype(np.float32)
    sx = np.maximum(np.abs(x2).max(axis=1, keepdims=True), np.float32(1e-12)) / np.float32(448)
    sw = np.maximum(np.abs(w2).max(axis=0), np.float32(1e-12)) / np.float32(448)
    qx = np.clip(x2 / sx, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    qw = np.clip(w2 / sw, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return ((qx @ qw) * sx * sw).reshape(t, *w.shape[contract:])


@pytest.mark.parametrize("x_shape, w_shape, contract", [
    ((37, 48), (48, 20), 1), ((29, 4, 8), (4, 8, 24), 2), ((16, 32), (32, 3, 8), 1)])
def test_fp8_matmul_matches_the_numpy_oracle(x_shape, w_shape, contract):
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(x_shape).astype(np.float32)
    x[3] *= 300.0        # an outlier token
    x[5] = 0.0           # an empty (padding) row: zeros out, never NaN
    w = (rng.standard_normal(w_shape) * rng.uniform(0.01, 2.0, w_shape[contract:])).astype(np.float32)
    qw = quantize_weight(jnp.asarray(w), contract)
    assert qw.values.dtype == FP8 and qw.out_shape == w_shape[contract:]
    got = np.asarray(jax.jit(dense, static_argnums=2)(jnp.asarray(x), qw, contract))
    ref = oracle(x, w, contract)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                               err_msg=f"seed {SEED}")
    assert np.isfinite(got).all() and (got[5] == 0).all()


def test_fp8_error_is_that_of_e4m3_rounding():
    """Against the exact product the error is E4M3's (a few percent), so the FP8 path really
    quantises, and no more."""
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = rng.standard_normal((256, 96)).astype(np.float32)
    got = np.asarray(fp8_matmul(jnp.asarray(x), quantize_weight(jnp.asarray(w))))
    exact = x.astype(np.float64) @ w.astype(np.float64)
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 0.01 < rel < 0.06, f"relative error {rel} (seed {SEED})"


def test_per_token_scales_keep_an_outlier_token_from_the_others():
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    w = quantize_weight(jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32)))
    before = np.asarray(fp8_matmul(jnp.asarray(x), w))
    x[2] *= 1e4
    after = np.asarray(fp8_matmul(jnp.asarray(x), w))
    np.testing.assert_array_equal(np.delete(after, 2, axis=0), np.delete(before, 2, axis=0))
    np.testing.assert_allclose(after[2], before[2] * 1e4, rtol=1e-5)


def test_quantize_weight_rejects_a_weight_without_output_dims():
    with pytest.raises(ValueError, match="at least one output dim"):
        quantize_weight(jnp.ones((4, 4)), contract=2)


def test_bf16_activations_keep_their_dtype():
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.standard_normal((8, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 16)), jnp.bfloat16)
    got = fp8_matmul(x, quantize_weight(w))
    assert got.dtype == jnp.bfloat16
    # the float32 activations' result (checked against the oracle above) rounded once to
    # bfloat16 (8 significant bits); not the oracle itself: bfloat16 inputs land on E4M3
    # rounding ties often, where a one-ulp difference in x / s flips the rounding
    ref = np.asarray(fp8_matmul(x.astype(jnp.float32), quantize_weight(w)))
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2 ** -8, atol=1e-6,
                               err_msg=f"seed {SEED}")


# --- the FP8 encoder ---------------------------------------------------------------------


CFG = BertConfig(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128)


def test_fp8_encoder_stays_close_to_float32():
    """Random weights of scale 0.1, packed sequences: every token's hidden state keeps a
    cosine >= 0.99 with the float32 encoder's (measured ~0.998), and differs from it."""
    weights = bert_weights.random_weights(CFG, jax.random.PRNGKey(SEED), scale=0.1)
    quantized = bert_weights.quantize_weights(weights, "fp8")
    layer = quantized.layers[0]
    assert all(isinstance(w, Fp8Weight) for w in (*layer.qkv, layer.o_proj, layer.up, layer.down))
    assert layer.qkv_bias.dtype == jnp.float32 and quantized.word_embed.dtype == jnp.float32
    rng = np.random.default_rng(SEED)
    ids = [[int(t) for t in rng.integers(0, CFG.vocab_size, n)] for n in (9, 1, 23, 14)]
    batch = build_encoder_batch(ids, 64, 8)
    encode = jax.jit(lambda w, b: bert.encode(w, b, cfg=CFG))
    ref, got = (np.asarray(encode(w, batch))[:47] for w in (weights, quantized))
    cos = cosine(got, ref)
    assert (cos >= 0.99).all(), f"min cosine {cos.min()} (seed {SEED})"
    assert np.abs(got - ref).max() > 1e-3


def test_quantize_weights_errors_name_the_problem():
    weights = bert_weights.random_weights(CFG, jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="unknown quantization 'int4'; supported: fp8"):
        bert_weights.quantize_weights(weights, "int4")
    with pytest.raises(ConfigError, match="already quantised"):
        bert_weights.quantize_weights(bert_weights.quantize_weights(weights, "fp8"), "fp8")
    with pytest.raises(ConfigError, match="quantization 'int8' is not one of fp8"):
        EmbeddingEngineConfig(quantization="int8")


def test_an_embedding_model_without_quantization_is_refused():
    from arctic_jax.engine.embedding_engine import EmbeddingEngine
    from arctic_jax.models.pooling import PoolingConfig
    from arctic_jax.models.registry import BERT
    from checkpoints.loader import LoadedModel

    spec = dataclasses.replace(BERT, name="bert-plain", quantize=None)
    loaded = LoadedModel(config=CFG, weights=bert_weights.random_weights(CFG, jax.random.PRNGKey(0)),
                         tokenizer_source=None, name="plain", spec=spec)
    with pytest.raises(ConfigError, match="has no fp8 quantization"):
        EmbeddingEngine(loaded, PoolingConfig(mode="cls", normalize=True),
                        EmbeddingEngineConfig(quantization="fp8"))


def test_minilm_fp8_embeddings_match_sentence_transformers():
    """The embedded all-MiniLM-L6-v2 with FP8 matmuls against sentence-transformers (float32):
    cosine >= 0.99 on short and long texts (measured 0.994-0.999); nothing compiles after the
    warm-up."""
    import sentence_transformers as st

    from arctic_jax import Embedder
    from checkpoints.loader import default_embedding_model_path

    rng = np.random.default_rng(SEED)
    embedder = Embedder("all-MiniLM-L6-v2", quantization="fp8", token_buckets=(256,),
                        max_num_batched_tokens=256, seq_buckets=(8,), max_num_seqs=8, warmup=True)
    words = [w for w in embedder.tokenizer.tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    texts = ["A man is eating food.", "The Eiffel Tower is in Paris.",
             " ".join(rng.choice(words, 40)) + ".", " ".join(rng.choice(words, 150)) + "."]
    ref = st.SentenceTransformer(default_embedding_model_path(), device="cpu").encode(texts)
    got = embedder.embed(texts)
    cos = cosine(got, ref)
    assert (cos >= 0.99).all(), f"cosines {cos} (seed {SEED})"
    assert np.abs(got - ref).max() > 1e-4   # the FP8 path ran
    assert embedder.engine.compiles_after_warmup == 0


def test_serving_a_text_generation_model_with_fp8_fails_clearly():
    """In a child process: ``serve`` sets up logging and signal handlers for the process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "arctic_jax.cli", "serve", "--model", "default",
                           "--quantization", "fp8", "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--quantization applies to embedding models only" in proc.stderr, proc.stderr[-2000:]


def test_only_fp8_capable_gpus_count_as_having_fp8_matmuls():
    from types import SimpleNamespace

    from arctic_jax.engine.embedding_engine import has_fp8_matmuls

    def dev(platform, cc=None):
        return SimpleNamespace(platform=platform, **({} if cc is None else {"compute_capability": cc}))

    assert has_fp8_matmuls(dev("gpu", "9.0")) and has_fp8_matmuls(dev("gpu", "8.9"))
    assert not has_fp8_matmuls(dev("gpu", "8.0")) and not has_fp8_matmuls(dev("gpu"))
    assert not has_fp8_matmuls(dev("cpu")) and not has_fp8_matmuls(dev("gpu", "n/a"))
    assert not has_fp8_matmuls(jax.devices()[0])    # the tests' CPU devices
