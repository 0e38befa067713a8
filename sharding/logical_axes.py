"""Logical axis names, declared once.

Every array the model owns names its axes with these strings. The mapping of
logical names onto mesh axes (``sharding.rules``) lives in one place; the
model code never names a mesh axis or writes a ``PartitionSpec``.
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
KV_GROUPS = "kv_groups"    # the stacked per-group axis of SwiftKV's K/V projection

# Activations.
TOKENS = "tokens"              # the flat, ragged token axis of a step, outside attention
ATTN_TOKENS = "attn_tokens"    # the token axis inside attention (all tokens)
ATTN_HEADS = "attn_heads"      # q / kv heads inside attention (always split over every device)
LOGITS_ROWS = "logits_rows"

# KV cache: each layer's K and V are [kv_heads, num_pages, page_size, head_dim].
CACHE_HEADS = "cache_heads"
PAGES = "pages"
PAGE_SLOTS = "page_slots"
KV_CACHE_AXES: LogicalAxes = (CACHE_HEADS, PAGES, PAGE_SLOTS, HEAD_DIM)

# Activation layouts at the points where the step constrains them.
HIDDEN_AXES: LogicalAxes = (TOKENS, EMBED)
ATTN_QKV_AXES: LogicalAxes = (ATTN_TOKENS, ATTN_HEADS, HEAD_DIM)
HEADS_OUT_AXES: LogicalAxes = (TOKENS, Q_HEADS, HEAD_DIM)
