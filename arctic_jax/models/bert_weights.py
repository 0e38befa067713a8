"""Weights of a BERT encoder as registered dataclass pytrees.

Shapes (H = hidden, N = heads, D = head dim, I = intermediate, V = vocab,
P = max positions, Y = token types). Matrices are stored ``[in, out]``:

- ``qkv``      [H, 3, N, D]   (query, key, value stacked; one matmul)   ``qkv_bias`` [3, N, D]
- ``o_proj``   [N, D, H]      ``o_bias``    [H]
- ``up``       [H, I]         ``up_bias``   [I]
- ``down``     [I, H]         ``down_bias`` [H]
- LayerNorms: ``attn_norm`` / ``mlp_norm`` (+ ``_bias``) [H], after each residual (post-LN)
- ``word_embed`` [V, H], ``position_embed`` [P, H], ``type_embed`` [Y, H],
  ``embed_norm`` / ``embed_norm_bias`` [H]

Each field declares its logical axes once, in its metadata. ``quantize_weights(w, "fp8")`` turns
each layer's four matrices into ``fp8.Fp8Weight`` (``qkv`` into a tuple of three, one each for
query, key and value, so each projection's output stays contiguous).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.config import QUANTIZATIONS, ConfigError
from arctic_jax.models.bert_config import BertConfig
from arctic_jax.models.fp8 import quantize_weight
from arctic_jax.models.llama_weights import check_layered_weights, normal, weight_field
from arctic_jax.pytree import pytree_dataclass, replace
from sharding import logical_axes as ax


@pytree_dataclass
class BertLayerWeights:
    qkv: jax.Array = weight_field(ax.EMBED, None, ax.Q_HEADS, ax.HEAD_DIM)
    qkv_bias: jax.Array = weight_field(None, ax.Q_HEADS, ax.HEAD_DIM)
    o_proj: jax.Array = weight_field(ax.Q_HEADS, ax.HEAD_DIM, ax.EMBED)
    o_bias: jax.Array = weight_field(ax.EMBED)
    attn_norm: jax.Array = weight_field(ax.EMBED)
    attn_norm_bias: jax.Array = weight_field(ax.EMBED)
    up: jax.Array = weight_field(ax.EMBED, ax.MLP)
    up_bias: jax.Array = weight_field(ax.MLP)
    down: jax.Array = weight_field(ax.MLP, ax.EMBED)
    down_bias: jax.Array = weight_field(ax.EMBED)
    mlp_norm: jax.Array = weight_field(ax.EMBED)
    mlp_norm_bias: jax.Array = weight_field(ax.EMBED)


@pytree_dataclass
class BertWeights:
    word_embed: jax.Array = weight_field(ax.VOCAB, ax.EMBED)
    position_embed: jax.Array = weight_field(None, ax.EMBED)
    type_embed: jax.Array = weight_field(None, ax.EMBED)
    embed_norm: jax.Array = weight_field(ax.EMBED)
    embed_norm_bias: jax.Array = weight_field(ax.EMBED)
    layers: tuple[BertLayerWeights, ...] = dataclasses.field(default=())


def expected_layer_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every BertLayerWeights field for ``cfg``."""
    H, N, D, I = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    return {
        "qkv": (H, 3, N, D), "qkv_bias": (3, N, D), "o_proj": (N, D, H), "o_bias": (H,),
        "attn_norm": (H,), "attn_norm_bias": (H,), "up": (H, I), "up_bias": (I,),
        "down": (I, H), "down_bias": (H,), "mlp_norm": (H,), "mlp_norm_bias": (H,),
    }


def expected_model_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every BertWeights array field (not ``layers``) for ``cfg``."""
    H = cfg.hidden_size
    return {
        "word_embed": (cfg.vocab_size, H), "position_embed": (cfg.max_position_embeddings, H),
        "type_embed": (cfg.type_vocab_size, H), "embed_norm": (H,), "embed_norm_bias": (H,),
    }


def validate_weights(weights: BertWeights, cfg: BertConfig) -> None:
    """Raise ValueError naming any field whose presence or shape disagrees with cfg."""
    check_layered_weights(weights, expected_model_shapes(cfg), expected_layer_shapes(cfg),
                          cfg.num_layers)


def _is_norm_weight(name: str) -> bool:
    return name.endswith("norm")


def random_weights(cfg: BertConfig, key: jax.Array, dtype: Any = jnp.float32,
                   scale: float = 0.02) -> BertWeights:
    """Random weights of the right shapes (tests and speed benchmarks), drawn on the device.

    Matrices, biases and embeddings ~ N(0, scale^2); LayerNorm weights ~ 1 + N(0, 0.1^2).
    """
    keys = iter(jax.random.split(key, 16 * (cfg.num_layers + 1)))
    dtype = jnp.dtype(dtype)

    def draw(name: str, shape: tuple[int, ...]) -> jax.Array:
        norm = _is_norm_weight(name)
        return normal(next(keys), shape, dtype, 1.0 if norm else 0.0, 0.1 if norm else scale)

    layer_shapes = expected_layer_shapes(cfg)
    layers = tuple(BertLayerWeights(**{n: draw(n, s) for n, s in layer_shapes.items()})
                   for _ in range(cfg.num_layers))
    return BertWeights(**{n: draw(n, s) for n, s in expected_model_shapes(cfg).items()},
                       layers=layers)


def qkv_weight(layer: BertLayerWeights, c: int) -> Any:
    """The query (0), key (1) or value (2) projection [H, N, D] of ``layer`` (an ``Fp8Weight``
    in a quantised layer)."""
    return layer.qkv[c] if isinstance(layer.qkv, tuple) else layer.qkv[:, c]


def quantize_weights(weights: BertWeights, method: str) -> BertWeights:
    """``weights`` with every layer's qkv, o_proj, up and down matrices quantised (``method``:
    one of ``config.QUANTIZATIONS``); embeddings, biases and LayerNorms keep their dtype."""
    if method not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {method!r}; supported: {', '.join(QUANTIZATIONS)}")
    if any(isinstance(layer.qkv, tuple) for layer in weights.layers):
        raise ConfigError("the weights are already quantised")
    layers = tuple(replace(layer, qkv=tuple(quantize_weight(layer.qkv[:, c]) for c in range(3)),
                           o_proj=quantize_weight(layer.o_proj, contract=2),
                           up=quantize_weight(layer.up), down=quantize_weight(layer.down))
                   for layer in weights.layers)
    return replace(weights, layers=layers)
