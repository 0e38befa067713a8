"""The BERT-family encoder as pure functions over ``BertWeights``.

Post-LN: embeddings (word + absolute position + token type) -> LayerNorm; each layer
x = LN(x + attn(x)); x = LN(x + mlp(x)). Attention is bidirectional within each sequence of
a packed ``EncoderBatch`` (``arctic_jax.attention.bidirectional``). Matmuls run in the
weights' dtype with float32 accumulation; LayerNorm, the residual sums and the activation
run in float32.
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
from arctic_jax.models.bert_weights import BertLayerWeights, BertWeights

_F32 = jnp.float32

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """x [..., H] (float32) normalised over H; float32 out."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps) * weight.astype(_F32) + bias.astype(_F32)


def embed(cfg: BertConfig, weights: BertWeights, batch: EncoderBatch) -> jax.Array:
    """Token ids, positions and token types [T] -> normed embeddings [T, H] (float32)."""
    x = (weights.word_embed[batch.token_ids].astype(_F32)
         + weights.position_embed[batch.positions].astype(_F32)
         + weights.type_embed[batch.token_types].astype(_F32))
    return layer_norm(x, weights.embed_norm, weights.embed_norm_bias, cfg.layer_norm_eps)


def attention_block(cfg: BertConfig, layer: BertLayerWeights, x: jax.Array, batch: EncoderBatch,
                    attention_impl: str) -> jax.Array:
    """x [T, H] (float32) -> LN(x + attention(x)) [T, H] (float32)."""
    dtype = layer.qkv.dtype
    qkv = jnp.einsum("th,hcnd->tcnd", x.astype(dtype), layer.qkv, preferred_element_type=_F32)
    qkv = (qkv + layer.qkv_bias.astype(_F32)).astype(dtype)
    attn = segment_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], batch, scale=cfg.head_dim ** -0.5,
                             impl=attention_impl)
    out = jnp.einsum("tnd,ndh->th", attn.astype(dtype), layer.o_proj, preferred_element_type=_F32)
    return layer_norm(x + out + layer.o_bias.astype(_F32), layer.attn_norm, layer.attn_norm_bias,
                      cfg.layer_norm_eps)


def mlp_block(cfg: BertConfig, layer: BertLayerWeights, x: jax.Array) -> jax.Array:
    """x [T, H] (float32) -> LN(x + down(act(up(x)))) [T, H] (float32)."""
    dtype = layer.up.dtype
    h = jnp.dot(x.astype(dtype), layer.up, preferred_element_type=_F32)
    h = activation(cfg.hidden_act)(h + layer.up_bias.astype(_F32)).astype(dtype)
    out = jnp.dot(h, layer.down, preferred_element_type=_F32)
    return layer_norm(x + out + layer.down_bias.astype(_F32), layer.mlp_norm, layer.mlp_norm_bias,
                      cfg.layer_norm_eps)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported hidden_act {name!r}; supported: "
                          f"{', '.join(ACTIVATIONS)}") from None


def encode(weights: BertWeights, batch: EncoderBatch, *, cfg: BertConfig,
           attention_impl: str = "reference") -> jax.Array:
    """The last hidden state [T, H] float32 of a packed batch (the residual stream's own
    precision, so pooling adds no rounding; padding rows: unspecified). ``attention_impl``:
    "reference" or "pallas"."""
    x = embed(cfg, weights, batch)
    for layer in weights.layers:
        x = attention_block(cfg, layer, x, batch, attention_impl)
        x = mlp_block(cfg, layer, x)
    return x


def head(weights: Any, hidden: Any, *, cfg: BertConfig, sharding: Any = None) -> Any:
    """An encoder has no LM head: ConfigError (``ModelSpec.head`` of embedding models)."""
    raise ConfigError("a BERT encoder is an embedding model and has no language-model head; "
                      "use arctic_jax.Embedder / serve it for /v1/embeddings")
