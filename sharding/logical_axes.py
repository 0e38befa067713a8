"""Logical axis names, declared once.

Every array the model owns names its axes with these strings. The mapping of
logical names onto mesh axes (the sharding rules) lives in one place and is
applied by whoever builds a mesh; the model code itself never names a mesh
axis or writes a ``PartitionSpec``.
"""
from __future__ import annotations

LogicalAxes = tuple[str | None, ...]

# Weights.
VOCAB = "vocab"
EMBED = "embed"            # model hidden size
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"                # intermediate size
KV_PAIR = "kv_pair"        # the stacked (k, v) axis of a fused projection
GATE_UP = "gate_up"        # the stacked (gate, up) axis

# Activations.
TOKENS = "tokens"          # the flat, ragged token axis of a step

# KV cache: each layer's K and V are [kv_heads, num_pages, page_size, head_dim].
PAGES = "pages"
PAGE_SLOTS = "page_slots"
KV_CACHE_AXES: LogicalAxes = (KV_HEADS, PAGES, PAGE_SLOTS, HEAD_DIM)
