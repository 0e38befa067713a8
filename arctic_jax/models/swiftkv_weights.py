"""Weights of a SwiftKV Llama as registered dataclass pytrees.

Shapes as in ``llama_weights`` (H hidden, N q heads, K kv heads, D head dim),
with L layers, Lkv = ``num_key_value_layers`` and G = (L - Lkv) / g K/V groups:

- ``layers``: the Lkv early layers, ordinary ``LayerWeights``
- ``norm_swiftkv`` [H]
- ``kv_fanout`` [H, G, 2, K, D]: every group's k and v projection, fused
  (``kv_fanout_bias`` [G, 2, K, D] with ``attention_bias``)
- the three are None when Lkv = L (no later layers: the Llama model)
- ``late_layers``: the L - Lkv later layers, ``LateLayerWeights`` (no K/V projection;
  ``q_proj`` is the checkpoint's ``q_proj_swiftkv``)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.config import ConfigError
from arctic_jax.models import llama_weights
from arctic_jax.models.llama_weights import LayerWeights, normal, optional_weight_field, weight_field
from arctic_jax.models.swiftkv_config import SwiftKVConfig
from arctic_jax.pytree import pytree_dataclass
from sharding import logical_axes as ax


@pytree_dataclass
class LateLayerWeights:
    """A layer >= Lkv: its queries come from ``q_proj`` (``q_proj_swiftkv``), its K/V from the
    shared SwiftKV projection."""

    input_norm: jax.Array = weight_field(ax.EMBED)
    q_proj: jax.Array = weight_field(ax.EMBED, ax.Q_HEADS, ax.HEAD_DIM)
    o_proj: jax.Array = weight_field(ax.Q_HEADS, ax.HEAD_DIM, ax.EMBED)
    post_norm: jax.Array = weight_field(ax.EMBED)
    gate_up: jax.Array = weight_field(ax.EMBED, ax.GATE_UP, ax.MLP)
    down: jax.Array = weight_field(ax.MLP, ax.EMBED)
    q_bias: jax.Array | None = optional_weight_field(ax.Q_HEADS, ax.HEAD_DIM)
    o_bias: jax.Array | None = optional_weight_field(ax.EMBED)
    gate_up_bias: jax.Array | None = optional_weight_field(ax.GATE_UP, ax.MLP)
    down_bias: jax.Array | None = optional_weight_field(ax.EMBED)


@pytree_dataclass
class SwiftKVWeights:
    embed: jax.Array = weight_field(ax.VOCAB, ax.EMBED)
    final_norm: jax.Array = weight_field(ax.EMBED)
    layers: tuple[LayerWeights, ...] = dataclasses.field(default=())
    late_layers: tuple[LateLayerWeights, ...] = dataclasses.field(default=())
    norm_swiftkv: jax.Array | None = optional_weight_field(ax.EMBED)
    kv_fanout: jax.Array | None = optional_weight_field(ax.EMBED, ax.KV_GROUPS, ax.KV_PAIR,
                                                        ax.KV_HEADS, ax.HEAD_DIM)
    kv_fanout_bias: jax.Array | None = optional_weight_field(ax.KV_GROUPS, ax.KV_PAIR, ax.KV_HEADS,
                                                             ax.HEAD_DIM)
    lm_head: jax.Array | None = optional_weight_field(ax.EMBED, ax.VOCAB)


_LATE_FIELDS = tuple(f.name for f in dataclasses.fields(LateLayerWeights))


def expected_shapes(cfg: SwiftKVConfig) -> dict[str, tuple[int, ...] | None]:
    """Shape of every top-level array field for ``cfg`` (None: absent)."""
    H, G, K, D = cfg.hidden_size, cfg.num_kv_groups, cfg.num_kv_heads, cfg.head_dim
    late = cfg.num_late_layers > 0
    return {**llama_weights.expected_model_shapes(cfg), "norm_swiftkv": (H,) if late else None,
            "kv_fanout": (H, G, 2, K, D) if late else None,
            "kv_fanout_bias": (G, 2, K, D) if late and cfg.attention_bias else None}


def expected_late_layer_shapes(cfg: SwiftKVConfig) -> dict[str, tuple[int, ...] | None]:
    shapes = llama_weights.expected_layer_shapes(cfg)
    return {name: shapes[name] for name in _LATE_FIELDS}


def validate_weights(weights: SwiftKVWeights, cfg: SwiftKVConfig) -> None:
    """Raise ValueError naming any field whose presence or shape disagrees with cfg."""
    if not isinstance(cfg, SwiftKVConfig):
        raise ConfigError(f"SwiftKV weights need a SwiftKVConfig, got {type(cfg).__name__}")
    problems = []
    for name, shape in expected_shapes(cfg).items():
        llama_weights.check_shape(problems, name, getattr(weights, name), shape)
    Lkv, late = cfg.num_key_value_layers, cfg.num_late_layers
    if len(weights.layers) != Lkv:
        problems.append(f"layers: {len(weights.layers)} layers, expected num_key_value_layers {Lkv}")
    if len(weights.late_layers) != late:
        problems.append(f"late_layers: {len(weights.late_layers)} layers, expected {late}")
    for where, layers, shapes in (("layers", weights.layers, llama_weights.expected_layer_shapes(cfg)),
                                  ("late_layers", weights.late_layers,
                                   expected_late_layer_shapes(cfg))):
        for i, layer in enumerate(layers):
            for name, shape in shapes.items():
                llama_weights.check_shape(problems, f"{where}[{i}].{name}", getattr(layer, name),
                                          shape)
    if problems:
        raise ValueError("weights do not match the config:\n  " + "\n  ".join(problems))


def random_weights(cfg: SwiftKVConfig, key: jax.Array, dtype: Any = jnp.float32,
                   scale: float = 0.02) -> SwiftKVWeights:
    """Random weights of the right shapes: matrices ~ N(0, scale^2), norms ~ 1 + N(0, 0.1^2)."""
    base_key, key = jax.random.split(key)
    base = llama_weights.random_weights(cfg.early_layers_config(), base_key, dtype, scale)
    keys = iter(jax.random.split(key, 16 * (cfg.num_late_layers + 1)))

    def draw(shape: tuple[int, ...] | None, *, norm: bool = False) -> jax.Array | None:
        if shape is None:
            return None
        return normal(next(keys), shape, jnp.dtype(dtype), 1.0 if norm else 0.0,
                       0.1 if norm else scale)

    late_shapes = expected_late_layer_shapes(cfg)
    late = tuple(LateLayerWeights(**{n: draw(s, norm=n.endswith("norm")) for n, s in late_shapes.items()})
                 for _ in range(cfg.num_late_layers))
    shapes = expected_shapes(cfg)
    return SwiftKVWeights(embed=base.embed, final_norm=base.final_norm, lm_head=base.lm_head,
                          layers=base.layers, late_layers=late,
                          norm_swiftkv=draw(shapes["norm_swiftkv"], norm=True),
                          kv_fanout=draw(shapes["kv_fanout"]),
                          kv_fanout_bias=draw(shapes["kv_fanout_bias"]))
