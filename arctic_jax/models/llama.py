"""The Llama-family decoder as pure functions over ``LlamaWeights``.

``step`` is the one step function for every phase (prefill, chunked prefill,
decode, mixed, speculative verify): it writes the step's K/V into the paged
cache and returns the final-normed hidden states of ``batch.logits_indices``
only. ``head`` turns those rows into logits; the runner composes the two, so a
draft model can read the same hidden rows. The blocks (``embed``, ``decoder_layer`` and its
jitted form ``shared_decoder_layer``, ``final_norm``, ``head``) are exported for models built
from them.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.batch import StepBatch
from arctic_jax.config import ModelConfig
from arctic_jax.kv_cache import KVCache, write_kv
from arctic_jax.models.llama_weights import LayerWeights, LlamaWeights
from arctic_jax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin
from arctic_jax.models.step_options import StepOptions
from sharding import logical_axes as ax
from sharding.rules import ActivationSharding, constrain


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., H] normalised in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def add_bias(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return x if bias is None else x + bias.astype(x.dtype)


def out_projection(attn: jax.Array, o_proj: jax.Array) -> jax.Array:
    """attn [T, N, D] x o_proj [N, D, H] -> [T, H], contracting (N, D) in the weights' own
    order (``jnp.einsum`` contracts them as (D, N), and XLA then copies the weights into that
    order on every step)."""
    return jax.lax.dot_general(attn, o_proj, (((1, 2), (0, 1)), ((), ())))


def attention_block(cfg: ModelConfig, opts: StepOptions, layer: LayerWeights, x: jax.Array,
                    cache_k: jax.Array, cache_v: jax.Array, batch: StepBatch,
                    cos: jax.Array, sin: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [T, H] -> attention output [T, H] (before the residual), updated cache."""
    sh = opts.sharding
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    q = add_bias(jnp.einsum("th,hnd->tnd", h, layer.q_proj), layer.q_bias)
    kv = add_bias(jnp.einsum("th,hckd->tckd", h, layer.kv_proj), layer.kv_bias)
    # Project the local tokens first, then move to the attention layout: all tokens,
    # heads split over every device (an all-to-all under SP).
    q = constrain(sh, q, ax.HEADS_OUT_AXES)
    kv = constrain(sh, kv, (ax.TOKENS, None, ax.KV_HEADS, ax.HEAD_DIM))
    q = constrain(sh, q, ax.ATTN_QKV_AXES)
    kv = constrain(sh, kv, (ax.ATTN_TOKENS, None, ax.ATTN_HEADS, ax.HEAD_DIM))
    q = apply_rope(q, cos, sin)
    k = apply_rope(kv[:, 0], cos, sin)
    cache_k, cache_v = write_kv(cache_k, cache_v, k, kv[:, 1], batch.slot_mapping)
    attn = opts.attention(q, k, kv[:, 1], cache_k, cache_v, batch, scale=cfg.head_dim ** -0.5,
                          sharding=sh)
    attn = constrain(sh, attn, ax.HEADS_OUT_AXES)  # back to the token layout
    out = add_bias(out_projection(attn, layer.o_proj), layer.o_bias)
    return constrain(sh, out, ax.HIDDEN_AXES), cache_k, cache_v


def mlp_block(cfg: ModelConfig, layer: LayerWeights, x: jax.Array) -> jax.Array:
    """x [T, H] -> SwiGLU MLP output [T, H] (before the residual)."""
    h = rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
    gu = add_bias(jnp.einsum("th,hci->tci", h, layer.gate_up), layer.gate_up_bias)
    act = jax.nn.silu(gu[:, 0]) * gu[:, 1]
    return add_bias(act @ layer.down, layer.down_bias)


def embed(weights: LlamaWeights, tokens: jax.Array, sh: ActivationSharding | None) -> jax.Array:
    """Token ids [T] -> hidden states [T, H]."""
    return constrain(sh, weights.embed[tokens], ax.HIDDEN_AXES)


def decoder_layer(cfg: ModelConfig, opts: StepOptions, layer: LayerWeights, x: jax.Array,
                  cache_k: jax.Array, cache_v: jax.Array, batch: StepBatch, cos: jax.Array,
                  sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pre-norm block: x [T, H] -> x [T, H] and the layer's updated cache."""
    attn, cache_k, cache_v = attention_block(cfg, opts, layer, x, cache_k, cache_v, batch, cos, sin)
    x = x + attn
    x = x + constrain(opts.sharding, mlp_block(cfg, layer, x), ax.HIDDEN_AXES)
    return x, cache_k, cache_v


# The layers of a step share one traced program: every layer has the same shapes, so the step
# traces (and lowers) one layer, not num_layers copies of it, and XLA inlines the calls (same
# speed on an H100, benchmarks/RESULTS.md). Tracing the 30 layers of SmolLM2 twice (the CPU's
# blocked attention has loops and conditionals) was most of a warm `generate`'s start-up.
shared_decoder_layer = jax.jit(decoder_layer, static_argnums=(0, 1))


def final_norm(cfg: ModelConfig, weights: LlamaWeights, x: jax.Array) -> jax.Array:
    """Residual stream x [R, H] -> final-normed hidden states [R, H]."""
    return rms_norm(x, weights.final_norm, cfg.rms_norm_eps)


def head(weights: LlamaWeights, hidden: jax.Array, *, cfg: ModelConfig,
         sharding: ActivationSharding | None = None) -> jax.Array:
    """Final-normed hidden rows [R, H] -> float32 logits [R, V], gathered (not vocab-split)."""
    if weights.lm_head is None:
        logits = jnp.einsum("rh,vh->rv", hidden, weights.embed, preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("rh,hv->rv", hidden, weights.lm_head,
                            preferred_element_type=jnp.float32)
    logits = constrain(sharding, logits, (ax.LOGITS_ROWS, ax.VOCAB))
    return constrain(sharding, logits, (ax.LOGITS_ROWS, None))  # gather the logits, not the head


def step(weights: LlamaWeights, kv_cache: KVCache, batch: StepBatch, *, cfg: ModelConfig,
         opts: StepOptions = StepOptions()) -> tuple[jax.Array, KVCache]:
    """One ragged step: the final-normed hidden rows [R, H] of ``batch.logits_indices`` and
    the updated cache."""
    inv_freq = inverse_frequencies(cfg)
    cos, sin = rope_cos_sin(batch.positions, inv_freq)
    sh = opts.sharding
    x = embed(weights, batch.tokens, sh)
    new_k, new_v = [], []
    for i, layer in enumerate(weights.layers):
        x, ck, cv = shared_decoder_layer(cfg, opts, layer, x, kv_cache.k[i], kv_cache.v[i],
                                         batch, cos, sin)
        new_k.append(ck)
        new_v.append(cv)
    rows = constrain(sh, x[batch.logits_indices], (ax.LOGITS_ROWS, ax.EMBED))
    hidden = final_norm(cfg, weights, rows)
    return hidden, KVCache(k=tuple(new_k), v=tuple(new_v), page_size=kv_cache.page_size)


def forward(weights: LlamaWeights, kv_cache: KVCache, batch: StepBatch, *, cfg: ModelConfig,
            opts: StepOptions = StepOptions()) -> tuple[jax.Array, KVCache]:
    """``step`` then ``head``: float32 logits [R, V] and the updated cache."""
    hidden, kv_cache = step(weights, kv_cache, batch, cfg=cfg, opts=opts)
    return head(weights, hidden, cfg=cfg, sharding=opts.sharding), kv_cache


def make_step_fn(cfg: ModelConfig, opts: StepOptions = StepOptions(), **jit_kwargs: Any
                 ) -> Callable[[LlamaWeights, KVCache, StepBatch], tuple[jax.Array, KVCache]]:
    """The jitted step ``(weights, kv_cache, batch) -> (logits, kv_cache)``; the cache is donated."""
    fn = functools.partial(forward, cfg=cfg, opts=opts)
    return jax.jit(fn, donate_argnums=(1,), **jit_kwargs)
