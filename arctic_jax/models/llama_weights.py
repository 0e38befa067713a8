"""Weights of a Llama-family decoder as registered dataclass pytrees.

Shapes (H = hidden, N = q heads, K = kv heads, D = head dim, I = intermediate,
V = vocab). Matrices are stored ``[in, out]`` so that ``x @ w`` applies them:

- ``q_proj``  [H, N, D]       ``kv_proj`` [H, 2, K, D]   (k and v stacked)
- ``o_proj``  [N, D, H]
- ``gate_up`` [H, 2, I]        ``down``    [I, H]
- ``embed``   [V, H]           ``lm_head`` [H, V] (None when tied to ``embed``)

Each field declares its logical axes once, in its metadata; sharding rules map
them onto a mesh.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.config import ModelConfig
from arctic_jax.pytree import pytree_dataclass
from sharding import logical_axes as ax


def weight_field(*axes: str | None) -> Any:
    return dataclasses.field(metadata={"axes": tuple(axes)})


def optional_weight_field(*axes: str | None) -> Any:
    return dataclasses.field(default=None, metadata={"axes": tuple(axes)})


@pytree_dataclass
class LayerWeights:
    input_norm: jax.Array = weight_field(ax.EMBED)
    q_proj: jax.Array = weight_field(ax.EMBED, ax.Q_HEADS, ax.HEAD_DIM)
    kv_proj: jax.Array = weight_field(ax.EMBED, ax.KV_PAIR, ax.KV_HEADS, ax.HEAD_DIM)
    o_proj: jax.Array = weight_field(ax.Q_HEADS, ax.HEAD_DIM, ax.EMBED)
    post_norm: jax.Array = weight_field(ax.EMBED)
    gate_up: jax.Array = weight_field(ax.EMBED, ax.GATE_UP, ax.MLP)
    down: jax.Array = weight_field(ax.MLP, ax.EMBED)
    q_bias: jax.Array | None = optional_weight_field(ax.Q_HEADS, ax.HEAD_DIM)
    kv_bias: jax.Array | None = optional_weight_field(ax.KV_PAIR, ax.KV_HEADS, ax.HEAD_DIM)
    o_bias: jax.Array | None = optional_weight_field(ax.EMBED)
    gate_up_bias: jax.Array | None = optional_weight_field(ax.GATE_UP, ax.MLP)
    down_bias: jax.Array | None = optional_weight_field(ax.EMBED)


@pytree_dataclass
class LlamaWeights:
    embed: jax.Array = weight_field(ax.VOCAB, ax.EMBED)
    final_norm: jax.Array = weight_field(ax.EMBED)
    layers: tuple[LayerWeights, ...] = dataclasses.field(default=())
    lm_head: jax.Array | None = optional_weight_field(ax.EMBED, ax.VOCAB)


def expected_layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
    """Shape of every LayerWeights field for ``cfg`` (None: absent)."""
    H, N, K, D, I = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    return {
        "input_norm": (H,), "q_proj": (H, N, D), "kv_proj": (H, 2, K, D),
        "o_proj": (N, D, H), "post_norm": (H,), "gate_up": (H, 2, I), "down": (I, H),
        "q_bias": (N, D) if cfg.attention_bias else None,
        "kv_bias": (2, K, D) if cfg.attention_bias else None,
        "o_bias": (H,) if cfg.attention_bias else None,
        "gate_up_bias": (2, I) if cfg.mlp_bias else None,
        "down_bias": (H,) if cfg.mlp_bias else None,
    }


def expected_model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
    return {
        "embed": (cfg.vocab_size, cfg.hidden_size),
        "final_norm": (cfg.hidden_size,),
        "lm_head": None if cfg.tie_word_embeddings else (cfg.hidden_size, cfg.vocab_size),
    }


def check_shape(problems: list[str], name: str, value: Any, shape: tuple[int, ...] | None) -> None:
    """Append to ``problems`` if ``value``'s presence or shape disagrees with ``shape``
    (None: must be absent)."""
    if shape is None and value is not None:
        problems.append(f"{name}: unexpected tensor of shape {tuple(value.shape)}")
    elif shape is not None and value is None:
        problems.append(f"{name}: missing, expected shape {shape}")
    elif shape is not None and tuple(value.shape) != shape:
        problems.append(f"{name}: shape {tuple(value.shape)}, expected {shape}")


def check_layered_weights(weights: Any, model_shapes: dict[str, Any], layer_shapes: dict[str, Any],
                          num_layers: int) -> None:
    """Raise ValueError naming every top-level field (``model_shapes``) and field of
    ``weights.layers[i]`` (``layer_shapes``) whose presence or shape is wrong."""
    problems: list[str] = []
    for name, shape in model_shapes.items():
        check_shape(problems, name, getattr(weights, name), shape)
    if len(weights.layers) != num_layers:
        problems.append(f"layers: {len(weights.layers)} layers, expected {num_layers}")
    for i, layer in enumerate(weights.layers):
        for name, shape in layer_shapes.items():
            check_shape(problems, f"layers[{i}].{name}", getattr(layer, name), shape)
    if problems:
        raise ValueError("weights do not match the config:\n  " + "\n  ".join(problems))


def validate_weights(weights: LlamaWeights, cfg: ModelConfig) -> None:
    """Raise ValueError naming any field whose presence or shape disagrees with cfg."""
    check_layered_weights(weights, expected_model_shapes(cfg), expected_layer_shapes(cfg),
                          cfg.num_layers)


def random_weights(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32,
                   scale: float = 0.02) -> LlamaWeights:
    """Random weights of the right shapes (for tests and speed benchmarks), drawn on the device.

    Matrices ~ N(0, scale^2); norm weights ~ 1 + N(0, 0.1^2).
    """
    keys = iter(jax.random.split(key, 16 * (cfg.num_layers + 1)))

    def draw(shape: tuple[int, ...] | None, *, norm: bool = False) -> jax.Array | None:
        if shape is None:
            return None
        return normal(next(keys), shape, jnp.dtype(dtype), 1.0 if norm else 0.0,
                       0.1 if norm else scale)

    layer_shapes = expected_layer_shapes(cfg)
    layers = tuple(
        LayerWeights(**{name: draw(shape, norm=name.endswith("norm"))
                        for name, shape in layer_shapes.items()})
        for _ in range(cfg.num_layers))
    model_shapes = expected_model_shapes(cfg)
    return LlamaWeights(
        embed=draw(model_shapes["embed"]),
        layers=layers,
        final_norm=draw(model_shapes["final_norm"], norm=True),
        lm_head=draw(model_shapes["lm_head"]),
    )


@functools.partial(jax.jit, static_argnums=(1, 2))
def normal(key: jax.Array, shape: tuple[int, ...], dtype: Any, mean: float,
            std: float) -> jax.Array:
    return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def field_axes(cls: type) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each array field of a weights dataclass."""
    return {f.name: f.metadata["axes"] for f in dataclasses.fields(cls) if "axes" in f.metadata}
