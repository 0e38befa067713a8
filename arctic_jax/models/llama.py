"""The Llama-family decoder as pure functions over ``LlamaWeights``.

``forward`` is the one step function for every phase (prefill, chunked
prefill, decode, mixed): it writes the step's K/V into the paged cache and
returns logits for ``batch.logits_indices`` only.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from arctic_jax.attention import contiguous_causal_attention, paged_attention
from arctic_jax.batch import StepBatch
from arctic_jax.config import ModelConfig
from arctic_jax.kv_cache import KVCache, write_kv
from arctic_jax.models.llama_weights import LayerWeights, LlamaWeights
from arctic_jax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin
from sharding import logical_axes as ax
from sharding.rules import ActivationSharding, constrain


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Compile-time choices of a step function."""

    attention_impl: str = "reference"
    sharding: ActivationSharding | None = None   # None: one device, no constraints
    # The batch is one sequence's first chunk (no cached prefix, its tokens first, padding
    # after): attention runs causally on the step's own K/V (cuDNN on a GPU), not the cache.
    contiguous_prefill: bool = False


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., H] normalised in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def _maybe_add(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return x if bias is None else x + bias.astype(x.dtype)


def attention_block(cfg: ModelConfig, opts: StepOptions, layer: LayerWeights, x: jax.Array,
                    cache_k: jax.Array, cache_v: jax.Array, batch: StepBatch,
                    cos: jax.Array, sin: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [T, H] -> attention output [T, H] (before the residual), updated cache."""
    sh = opts.sharding
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    q = _maybe_add(jnp.einsum("th,hnd->tnd", h, layer.q_proj), layer.q_bias)
    kv = _maybe_add(jnp.einsum("th,hckd->tckd", h, layer.kv_proj), layer.kv_bias)
    # Project the local tokens first, then move to the attention layout: all tokens,
    # heads split over every device (an all-to-all under SP).
    q = constrain(sh, q, ax.HEADS_OUT_AXES)
    kv = constrain(sh, kv, (ax.TOKENS, None, ax.KV_HEADS, ax.HEAD_DIM))
    q = constrain(sh, q, ax.ATTN_QKV_AXES)
    kv = constrain(sh, kv, (ax.ATTN_TOKENS, None, ax.ATTN_HEADS, ax.HEAD_DIM))
    q = apply_rope(q, cos, sin)
    k = apply_rope(kv[:, 0], cos, sin)
    cache_k, cache_v = write_kv(cache_k, cache_v, k, kv[:, 1], batch.slot_mapping)
    scale = cfg.head_dim ** -0.5
    if opts.contiguous_prefill:
        attn = contiguous_causal_attention(q, k, kv[:, 1], scale=scale, impl=opts.attention_impl,
                                           sharding=sh)
    else:
        attn = paged_attention(q, cache_k, cache_v, batch, scale=scale, impl=opts.attention_impl,
                               sharding=sh)
    attn = constrain(sh, attn, ax.HEADS_OUT_AXES)  # back to the token layout
    out = _maybe_add(jnp.einsum("tnd,ndh->th", attn, layer.o_proj), layer.o_bias)
    return constrain(sh, out, ax.HIDDEN_AXES), cache_k, cache_v


def mlp_block(cfg: ModelConfig, layer: LayerWeights, x: jax.Array) -> jax.Array:
    """x [T, H] -> SwiGLU MLP output [T, H] (before the residual)."""
    h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
    gu = _maybe_add(jnp.einsum("th,hci->tci", h, layer.gate_up), layer.gate_up_bias)
    act = jax.nn.silu(gu[:, 0]) * gu[:, 1]
    return _maybe_add(act @ layer.down, layer.down_bias)


def lm_head(cfg: ModelConfig, weights: LlamaWeights, x: jax.Array) -> jax.Array:
    """Final hidden states x [R, H] -> float32 logits [R, V]."""
    h = rms_norm(x, weights.final_norm, cfg.rms_norm_eps)
    if weights.lm_head is None:
        return jnp.einsum("rh,vh->rv", h, weights.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("rh,hv->rv", h, weights.lm_head, preferred_element_type=jnp.float32)


def forward(weights: LlamaWeights, kv_cache: KVCache, batch: StepBatch, *, cfg: ModelConfig,
            opts: StepOptions = StepOptions()) -> tuple[jax.Array, KVCache]:
    """One ragged step: returns float32 logits [R, V] and the updated cache."""
    inv_freq = inverse_frequencies(cfg)
    cos, sin = rope_cos_sin(batch.positions, inv_freq)
    sh = opts.sharding
    x = constrain(sh, weights.embed[batch.tokens], ax.HIDDEN_AXES)
    new_k, new_v = [], []
    for i, layer in enumerate(weights.layers):
        attn, ck, cv = attention_block(cfg, opts, layer, x, kv_cache.k[i], kv_cache.v[i],
                                       batch, cos, sin)
        x = x + attn
        x = x + constrain(sh, mlp_block(cfg, layer, x), ax.HIDDEN_AXES)
        new_k.append(ck)
        new_v.append(cv)
    rows = constrain(sh, x[batch.logits_indices], (ax.LOGITS_ROWS, ax.EMBED))
    logits = constrain(sh, lm_head(cfg, weights, rows), (ax.LOGITS_ROWS, ax.VOCAB))
    logits = constrain(sh, logits, (ax.LOGITS_ROWS, None))  # gather the logits, not the head
    return logits, KVCache(k=tuple(new_k), v=tuple(new_v), page_size=kv_cache.page_size)


def make_step_fn(cfg: ModelConfig, opts: StepOptions = StepOptions(), **jit_kwargs: Any
                 ) -> Callable[[LlamaWeights, KVCache, StepBatch], tuple[jax.Array, KVCache]]:
    """The jitted step ``(weights, kv_cache, batch) -> (logits, kv_cache)``; the cache is donated."""
    fn = functools.partial(forward, cfg=cfg, opts=opts)
    return jax.jit(fn, donate_argnums=(1,), **jit_kwargs)
