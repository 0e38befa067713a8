"""Where a SwiftKV checkpoint (Snowflake's ``llama_swiftkv`` layout) keeps its tensors.

A stock Llama checkpoint plus, for Lkv = ``num_key_value_layers`` and g =
``key_value_group_size``:

- ``model.norm_swiftkv.weight`` [H]
- ``model.layers.{i}.self_attn.q_proj_swiftkv.weight`` [N*D, H] for i >= Lkv
- ``model.layers.{i}.self_attn.{k,v}_proj_swiftkv.weight`` [K*D, H] where (i - Lkv) % g == 0
- the ``.bias`` of each with ``attention_bias``

The teacher's own q/k/v projections of layers >= Lkv usually remain in the file;
they are allowed (``unused_tensors``), never read, and named in a log line.
``convert`` fuses every group's k/v into ``kv_fanout`` [H, G, 2, K, D].
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from arctic_jax.models import llama_layout
from arctic_jax.models.llama_layout import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    TensorReader,
    kv_projection,
    layer_fields,
    layer_prefix,
    layer_tensor_shapes,
)
from arctic_jax.models.swiftkv_config import SwiftKVConfig
from arctic_jax.models.swiftkv_weights import LateLayerWeights, SwiftKVWeights

NORM_SWIFTKV = "model.norm_swiftkv.weight"
Q_PROJ_SWIFTKV = "self_attn.q_proj_swiftkv"
KV_PROJ_SWIFTKV = "self_attn.{}_proj_swiftkv"


def group_layers(cfg: SwiftKVConfig) -> range:
    """The layers whose checkpoint tensors hold a K/V group's projection: Lkv, Lkv + g, ..."""
    return range(cfg.num_key_value_layers, cfg.num_layers, cfg.key_value_group_size)


class SwiftKVLayout(llama_layout.LlamaLayout):
    """Snowflake's SwiftKV tensor names (see the module docstring); GGUF files are Llama's."""

    def tensor_shapes(self, cfg: SwiftKVConfig) -> dict[str, tuple[int, ...]]:
        H, K, D = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
        shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, H), FINAL_NORM: (H,)}
        if not cfg.tie_word_embeddings:
            shapes[LM_HEAD] = (cfg.vocab_size, H)
        for i in range(cfg.num_key_value_layers):
            shapes.update(layer_tensor_shapes(cfg, i))
        if cfg.num_late_layers:
            shapes[NORM_SWIFTKV] = (H,)
        for i in range(cfg.num_key_value_layers, cfg.num_layers):
            shapes.update(layer_tensor_shapes(cfg, i, q_proj=Q_PROJ_SWIFTKV, with_kv=False))
        for i in group_layers(cfg):
            p = layer_prefix(i) + KV_PROJ_SWIFTKV
            for kv in "kv":
                shapes[p.format(kv) + ".weight"] = (K * D, H)
                if cfg.attention_bias:
                    shapes[p.format(kv) + ".bias"] = (K * D,)
        return shapes

    def unused_tensors(self, cfg: SwiftKVConfig) -> dict[str, tuple[int, ...]]:
        """The teacher's q/k/v projections of layers >= Lkv, and ``norm_swiftkv`` when no layer
        comes after Lkv (``swiftkv: false``)."""
        teacher = {}
        for i in range(cfg.num_key_value_layers, cfg.num_layers):
            shapes = layer_tensor_shapes(cfg, i)
            p = layer_prefix(i) + "self_attn."
            teacher.update({n: s for n, s in shapes.items()
                            if n.startswith((p + "q_proj.", p + "k_proj.", p + "v_proj."))})
        if not cfg.num_late_layers:
            teacher[NORM_SWIFTKV] = (cfg.hidden_size,)
        return teacher

    def convert(self, read: TensorReader, cfg: SwiftKVConfig, dtype: Any) -> SwiftKVWeights:
        """Read every tensor of ``tensor_shapes(cfg)`` once and build SwiftKVWeights in ``dtype``."""
        base = super().convert(read, cfg.early_layers_config(), dtype)
        late = tuple(LateLayerWeights(**layer_fields(read, cfg, i, dtype, q_proj=Q_PROJ_SWIFTKV,
                                                     with_kv=False))
                     for i in range(cfg.num_key_value_layers, cfg.num_layers))
        norm = kv_fanout = kv_bias = None
        if cfg.num_late_layers:
            norm = jnp.asarray(read(NORM_SWIFTKV)).astype(dtype)
            groups = [kv_projection(read, cfg, layer_prefix(i) + KV_PROJ_SWIFTKV, dtype)
                      for i in group_layers(cfg)]
            kv_fanout = jnp.stack([w for w, _ in groups], axis=1)
            if cfg.attention_bias:
                kv_bias = jnp.stack([b for _, b in groups], axis=0)
        return SwiftKVWeights(embed=base.embed, final_norm=base.final_norm, lm_head=base.lm_head,
                              layers=base.layers, late_layers=late, norm_swiftkv=norm,
                              kv_fanout=kv_fanout, kv_fanout_bias=kv_bias)


LAYOUT = SwiftKVLayout()
