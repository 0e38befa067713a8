"""Dense (no paged cache) causal forward passes of a Llama teacher and its SwiftKV student over a
right-padded batch of token rows [B, T] at positions 0 .. T-1, for distillation.

Built from the Llama blocks (``rms_norm``, ``add_bias``, ``apply_rope``, ``mlp_block``,
``final_norm``, ``head``) and SwiftKV's ``kv_fanout``; attention is
``jax.nn.dot_product_attention`` (causal, GQA), so padding at the end of a row never reaches a
real position. Every token runs every layer (the serving step runs the later layers on the
logits rows only; the results agree).

The student's trainable part is ``SwiftKVTrainable``: ``norm_swiftkv``, every later layer's
``q_proj_swiftkv`` (and bias) and the fused K/V projection of every group; everything else is
the teacher's (``student_weights``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models import llama, swiftkv
from arctic_jax.models.llama import add_bias, rms_norm
from arctic_jax.models.llama_weights import LayerWeights, LlamaWeights
from arctic_jax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin
from arctic_jax.models.step_options import StepOptions
from arctic_jax.models.swiftkv_config import SwiftKVConfig
from arctic_jax.models.swiftkv_weights import LateLayerWeights, SwiftKVWeights
from arctic_jax.pytree import pytree_dataclass


@pytree_dataclass
class SwiftKVTrainable:
    """What distillation trains (Lt = L - Lkv later layers, G groups):

    - ``norm_swiftkv`` [H]
    - ``q_proj`` Lt x [H, N, D] (``q_proj_swiftkv``), ``q_bias`` Lt x [N, D] with attention_bias
    - ``kv_fanout`` [H, G, 2, K, D], ``kv_fanout_bias`` [G, 2, K, D] with attention_bias
    """

    norm_swiftkv: jax.Array
    q_proj: tuple[jax.Array, ...]
    kv_fanout: jax.Array
    q_bias: tuple[jax.Array, ...] | None = None
    kv_fanout_bias: jax.Array | None = None


@pytree_dataclass
class DistillOutputs:
    """Logits [B*T, V] float32 and the residual stream entering the last decoder layer
    (HF's ``hidden_states[-2]``) [B*T, H] of the frozen teacher and of the student."""

    teacher_logits: jax.Array
    student_logits: jax.Array
    teacher_penultimate: jax.Array
    student_penultimate: jax.Array


def _check_distillable(teacher: LlamaWeights, cfg: SwiftKVConfig) -> None:
    if cfg.num_late_layers < 1:
        raise ConfigError(f"num_key_value_layers {cfg.num_key_value_layers} leaves no later layer "
                          f"of {cfg.num_layers} to distil")
    if len(teacher.layers) != cfg.num_layers:
        raise ValueError(f"the teacher has {len(teacher.layers)} layers, the config "
                         f"{cfg.num_layers}")


def group_members(cfg: SwiftKVConfig, group: int) -> range:
    """The decoder layers sharing K/V group ``group``: Lkv + group*g .. Lkv + (group+1)*g - 1."""
    first = cfg.num_key_value_layers + group * cfg.key_value_group_size
    return range(first, first + cfg.key_value_group_size)


def init_trainable(teacher: LlamaWeights, cfg: SwiftKVConfig) -> SwiftKVTrainable:
    """SwiftKV's initialisation, in float32: ``norm_swiftkv`` <- layer Lkv's input norm, each later
    layer's ``q_proj_swiftkv`` <- its own ``q_proj`` (and bias), each group's K/V projection <- the
    mean of its layers' k/v projections (and biases)."""
    _check_distillable(teacher, cfg)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    late = teacher.layers[cfg.num_key_value_layers:]
    groups = [[teacher.layers[i] for i in group_members(cfg, j)] for j in range(cfg.num_kv_groups)]
    kv = jnp.stack([jnp.mean(jnp.stack([f32(m.kv_proj) for m in g]), axis=0) for g in groups], axis=1)
    kv_bias = None
    if cfg.attention_bias:
        kv_bias = jnp.stack([jnp.mean(jnp.stack([f32(m.kv_bias) for m in g]), axis=0)
                             for g in groups])
    return SwiftKVTrainable(
        norm_swiftkv=f32(teacher.layers[cfg.num_key_value_layers].input_norm),
        q_proj=tuple(f32(layer.q_proj) for layer in late), kv_fanout=kv,
        q_bias=tuple(f32(layer.q_bias) for layer in late) if cfg.attention_bias else None,
        kv_fanout_bias=kv_bias)


def trainable_of(weights: SwiftKVWeights) -> SwiftKVTrainable:
    """The trainable part of a SwiftKV model's weights (their dtype)."""
    late = weights.late_layers
    return SwiftKVTrainable(norm_swiftkv=weights.norm_swiftkv,
                            q_proj=tuple(layer.q_proj for layer in late),
                            kv_fanout=weights.kv_fanout,
                            q_bias=None if late[0].q_bias is None
                            else tuple(layer.q_bias for layer in late),
                            kv_fanout_bias=weights.kv_fanout_bias)


def student_weights(teacher: LlamaWeights, trainable: SwiftKVTrainable, cfg: SwiftKVConfig
                    ) -> SwiftKVWeights:
    """The SwiftKV model: the teacher's weights with ``trainable`` (cast to the teacher's dtype)
    in place of its later layers' q/k/v."""
    _check_distillable(teacher, cfg)
    dtype = teacher.embed.dtype
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    Lkv = cfg.num_key_value_layers
    late = []
    for j, layer in enumerate(teacher.layers[Lkv:]):
        late.append(LateLayerWeights(
            input_norm=layer.input_norm, q_proj=cast(trainable.q_proj[j]), o_proj=layer.o_proj,
            post_norm=layer.post_norm, gate_up=layer.gate_up, down=layer.down,
            q_bias=None if trainable.q_bias is None else cast(trainable.q_bias[j]),
            o_bias=layer.o_bias, gate_up_bias=layer.gate_up_bias, down_bias=layer.down_bias))
    return SwiftKVWeights(embed=teacher.embed, final_norm=teacher.final_norm,
                          lm_head=teacher.lm_head, layers=teacher.layers[:Lkv],
                          late_layers=tuple(late), norm_swiftkv=cast(trainable.norm_swiftkv),
                          kv_fanout=cast(trainable.kv_fanout),
                          kv_fanout_bias=cast(trainable.kv_fanout_bias))


# ------------------------------------------------------------------------------- dense blocks

def rope_tables(cfg: ModelConfig, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch * length, D] of rows at positions 0 .. length-1."""
    positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), batch)
    return rope_cos_sin(positions, inverse_frequencies(cfg))


def causal_attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, batch: int
                     ) -> jax.Array:
    """q [B*T, N, D], k and v [B*T, K, D] (RoPE'd) -> [B*T, N, D], each row attending causally
    within its own length-T row."""
    def rows(x: jax.Array) -> jax.Array:
        return x.reshape(batch, -1, *x.shape[1:])

    out = jax.nn.dot_product_attention(rows(q), rows(k), rows(v), scale=cfg.head_dim ** -0.5,
                                       is_causal=True)
    return out.reshape(q.shape)


def _finish_layer(cfg: ModelConfig, layer: LayerWeights | LateLayerWeights, x: jax.Array,
                  q: jax.Array, k: jax.Array, v: jax.Array, batch: int) -> jax.Array:
    """Attention of q over k, v, the output projection and the MLP, with their residuals."""
    attn = causal_attention(cfg, q, k, v, batch)
    x = x + add_bias(jnp.einsum("tnd,ndh->th", attn, layer.o_proj), layer.o_bias)
    return x + llama.mlp_block(cfg, layer, x)


def llama_layer(cfg: ModelConfig, layer: LayerWeights, x: jax.Array, cos: jax.Array,
                sin: jax.Array, batch: int) -> jax.Array:
    """One Llama decoder layer: x [B*T, H] -> x [B*T, H]."""
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    q = apply_rope(add_bias(jnp.einsum("th,hnd->tnd", h, layer.q_proj), layer.q_bias), cos, sin)
    kv = add_bias(jnp.einsum("th,hckd->tckd", h, layer.kv_proj), layer.kv_bias)
    return _finish_layer(cfg, layer, x, q, apply_rope(kv[:, 0], cos, sin), kv[:, 1], batch)


def late_layer(cfg: SwiftKVConfig, layer: LateLayerWeights, x: jax.Array, k: jax.Array,
               v: jax.Array, cos: jax.Array, sin: jax.Array, batch: int) -> jax.Array:
    """One SwiftKV layer >= Lkv: its queries from ``q_proj_swiftkv``, its K/V (RoPE'd k, v
    [B*T, K, D]) from its group's projection."""
    h = rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
    q = apply_rope(add_bias(jnp.einsum("th,hnd->tnd", h, layer.q_proj), layer.q_bias), cos, sin)
    return _finish_layer(cfg, layer, x, q, k, v, batch)


def llama_stack(cfg: ModelConfig, layers: tuple[LayerWeights, ...], x: jax.Array, cos: jax.Array,
                sin: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """Run ``layers`` (at least one): (output [B*T, H], the residual entering the last of them)."""
    before_last = x
    for layer in layers:
        before_last = x
        x = llama_layer(cfg, layer, x, cos, sin, batch)
    return x, before_last


def swiftkv_late_stack(cfg: SwiftKVConfig, weights: SwiftKVWeights, x: jax.Array, cos: jax.Array,
                       sin: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """From the residual entering layer Lkv [B*T, H] through layers [Lkv, L): (output, the
    residual entering the last layer)."""
    k, v = swiftkv.kv_fanout(cfg, StepOptions(), weights, x, cos, sin)
    Lkv = cfg.num_key_value_layers
    before_last = x
    for j, layer in enumerate(weights.late_layers):
        before_last = x
        g = cfg.cache_layer(Lkv + j) - Lkv
        x = late_layer(cfg, layer, x, k[:, g], v[:, g], cos, sin, batch)
    return x, before_last


def _logits(cfg: ModelConfig, weights: LlamaWeights | SwiftKVWeights, x: jax.Array) -> jax.Array:
    return llama.head(weights, llama.final_norm(cfg, weights, x), cfg=cfg)


def llama_forward(cfg: ModelConfig, weights: LlamaWeights, tokens: jax.Array) -> jax.Array:
    """Token rows [B, T] -> float32 logits [B, T, V] of the Llama model."""
    B, T = tokens.shape
    cos, sin = rope_tables(cfg, B, T)
    x, _ = llama_stack(cfg, weights.layers, weights.embed[tokens.reshape(-1)], cos, sin, B)
    return _logits(cfg, weights, x).reshape(B, T, -1)


def swiftkv_forward(cfg: SwiftKVConfig, weights: SwiftKVWeights, tokens: jax.Array) -> jax.Array:
    """Token rows [B, T] -> float32 logits [B, T, V] of the SwiftKV model (Lkv < L)."""
    B, T = tokens.shape
    cos, sin = rope_tables(cfg, B, T)
    x, _ = llama_stack(cfg, weights.layers, weights.embed[tokens.reshape(-1)], cos, sin, B)
    x, _ = swiftkv_late_stack(cfg, weights, x, cos, sin, B)
    return _logits(cfg, weights, x).reshape(B, T, -1)


def distill_forward(cfg: SwiftKVConfig, teacher: LlamaWeights, trainable: SwiftKVTrainable,
                    tokens: jax.Array) -> DistillOutputs:
    """Teacher and student over token rows [B, T]. Layers [0, Lkv) are shared and frozen: they
    run once, without gradient; the teacher's later layers run without gradient too, so only the
    student's later part (from ``trainable``) is differentiated."""
    _check_distillable(teacher, cfg)
    B, T = tokens.shape
    Lkv = cfg.num_key_value_layers
    cos, sin = rope_tables(cfg, B, T)
    x = teacher.embed[tokens.reshape(-1)]
    x, _ = llama_stack(cfg, teacher.layers[:Lkv], x, cos, sin, B)
    x = jax.lax.stop_gradient(x)
    t_out, t_prev = llama_stack(cfg, teacher.layers[Lkv:], x, cos, sin, B)
    t_logits = jax.lax.stop_gradient(_logits(cfg, teacher, t_out))
    student = student_weights(teacher, trainable, cfg)
    s_out, s_prev = swiftkv_late_stack(cfg, student, x, cos, sin, B)
    return DistillOutputs(teacher_logits=t_logits, student_logits=_logits(cfg, student, s_out),
                          teacher_penultimate=jax.lax.stop_gradient(t_prev),
                          student_penultimate=s_prev)
