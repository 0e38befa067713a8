"""The BERT-family encoder as pure functions over ``BertWeights``.

Post-LN: embeddings (word + absolute position + token type) -> LayerNorm; each layer
x = LN(x + attn(x)); x = LN(x + mlp(x)). Attention is bidirectional within each sequence of
a packed ``EncoderBatch`` (``arctic_jax.attention.bidirectional``).

Precision, as transformers' half-precision models: activations between ops, the matmul
outputs and the residual stream are in the weights' dtype (the matmuls accumulate in float32);
LayerNorm statistics and the activation function are computed in float32 inside their
element-wise fusions, so no float32 copy of an activation is written to memory (on a GPU the
float32 intermediates were most of the encoder's memory traffic). The encoder's output is
float32. With float32 weights everything is float32. With ``quantize_weights(w, "fp8")`` the
four matmuls of each layer run on FP8 operands (``arctic_jax.models.fp8``); the rest is
unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.attention.bidirectional import segment_attention
from arctic_jax.config import ConfigError
from arctic_jax.encoder_batch import EncoderBatch
from arctic_jax.models.bert_config import BertConfig
from arctic_jax.models.bert_weights import BertLayerWeights, BertWeights, qkv_weight
from arctic_jax.models.fp8 import dense

_F32 = jnp.float32

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """x [..., H] normalised over H (statistics in float32); out in x's dtype."""
    h = x.astype(_F32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    centred = h - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    out = centred * jax.lax.rsqrt(var + eps) * weight.astype(_F32) + bias.astype(_F32)
    return out.astype(x.dtype)


def embed(cfg: BertConfig, weights: BertWeights, batch: EncoderBatch) -> jax.Array:
    """Token ids, positions and token types [T] -> normed embeddings [T, H] (weights' dtype;
    the three are summed in float32)."""
    x = (weights.word_embed[batch.token_ids].astype(_F32)
         + weights.position_embed[batch.positions].astype(_F32)
         + weights.type_embed[batch.token_types].astype(_F32))
    out = layer_norm(x, weights.embed_norm, weights.embed_norm_bias, cfg.layer_norm_eps)
    return out.astype(weights.word_embed.dtype)


def attention_block(cfg: BertConfig, layer: BertLayerWeights, x: jax.Array, batch: EncoderBatch,
                    attention_impl: str) -> jax.Array:
    """x [T, H] -> LN(x + attention(x)) [T, H] (weights' dtype). q, k and v are three
    matmuls, so each enters the attention kernel contiguous."""
    q, k, v = (dense(x, qkv_weight(layer, c)) + layer.qkv_bias[c] for c in range(3))
    attn = segment_attention(q, k, v, batch, scale=cfg.head_dim ** -0.5, impl=attention_impl)
    # contract (N, D) in the weights' order: an einsum contracts (D, N) and XLA then copies
    # o_proj into that order on every call
    out = dense(attn.astype(x.dtype), layer.o_proj, contract=2)
    return layer_norm(x + out + layer.o_bias, layer.attn_norm, layer.attn_norm_bias,
                      cfg.layer_norm_eps)


def mlp_block(cfg: BertConfig, layer: BertLayerWeights, x: jax.Array) -> jax.Array:
    """x [T, H] -> LN(x + down(act(up(x)))) [T, H] (weights' dtype; the activation in
    float32)."""
    h = dense(x, layer.up) + layer.up_bias
    h = activation(cfg.hidden_act)(h.astype(_F32)).astype(x.dtype)
    out = dense(h, layer.down)
    return layer_norm(x + out + layer.down_bias, layer.mlp_norm, layer.mlp_norm_bias,
                      cfg.layer_norm_eps)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported hidden_act {name!r}; supported: "
                          f"{', '.join(ACTIVATIONS)}") from None


def encode(weights: BertWeights, batch: EncoderBatch, *, cfg: BertConfig,
           attention_impl: str = "reference") -> jax.Array:
    """The last hidden state [T, H] float32 of a packed batch (padding rows: unspecified).
    ``attention_impl``: "reference" or "pallas"."""
    x = embed(cfg, weights, batch)
    for layer in weights.layers:
        x = attention_block(cfg, layer, x, batch, attention_impl)
        x = mlp_block(cfg, layer, x)
    return x.astype(_F32)


def head(weights: Any, hidden: Any, *, cfg: BertConfig, sharding: Any = None) -> Any:
    """An encoder has no LM head: ConfigError (``ModelSpec.head`` of embedding models)."""
    raise ConfigError("a BERT encoder is an embedding model and has no language-model head; "
                      "use arctic_jax.Embedder / serve it for /v1/embeddings")
