"""Where a Llama checkpoint keeps its tensors: HF names, torch shapes, GGUF names.

The checkpoint readers present tensors under their HF names in torch
``nn.Linear`` layout (``[out, in]``); ``LAYOUT.convert`` turns them, on the
device, into ``LlamaWeights``:

- ``q_proj.weight`` [N*D, H]              -> ``q_proj`` [H, N, D]
- ``k_proj/v_proj.weight`` [K*D, H] each  -> ``kv_proj`` [H, 2, K, D]
- ``o_proj.weight`` [H, N*D]              -> ``o_proj`` [N, D, H]
- ``gate_proj/up_proj.weight`` [I, H]     -> ``gate_up`` [H, 2, I]
- ``down_proj.weight`` [H, I]             -> ``down`` [I, H]
- ``embed_tokens.weight`` [V, H]          -> ``embed`` [V, H]
- ``lm_head.weight`` [V, H]               -> ``lm_head`` [H, V]

Tied embeddings: a tied checkpoint normally has no ``lm_head.weight``; one
that has it must hold a copy of ``embed_tokens.weight`` (``tied_tensors``).

GGUF (llama.cpp): tensors have their own names (``blk.{i}.attn_q.weight``),
the rows of ``attn_q``/``attn_k`` (weights and biases) are in an interleaved
rotary order, and Llama-3 rope scaling is stored as a ``rope_freqs.weight``
tensor; ``from_gguf`` and ``gguf_rope_parameters`` undo both.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models.llama_weights import LayerWeights, LlamaWeights
from arctic_jax.models.rope import inverse_frequencies

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
Q_PROJ = "self_attn.q_proj"

# Buffers some HF checkpoints carry that hold no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": EMBED,
    "output_norm.weight": FINAL_NORM,
    "output.weight": LM_HEAD,
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")

TensorReader = Callable[[str], Any]
"""Reads one tensor by HF name, in torch layout (numpy or jax array)."""


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation of a torch-layout [rows, ...] tensor."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} rotary heads")
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class LlamaLayout:
    """The tensor-name layout of Llama checkpoints (see the module docstring)."""

    def tensor_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint for ``cfg`` must hold, in torch layout."""
        H, V = cfg.hidden_size, cfg.vocab_size
        shapes: dict[str, tuple[int, ...]] = {EMBED: (V, H), FINAL_NORM: (H,)}
        if not cfg.tie_word_embeddings:
            shapes[LM_HEAD] = (V, H)
        for i in range(cfg.num_layers):
            shapes.update(layer_tensor_shapes(cfg, i))
        return shapes

    def tied_tensors(self, cfg: ModelConfig) -> dict[str, str]:
        """Tensors a checkpoint may also hold, each of which must equal the tensor it maps to."""
        return {LM_HEAD: EMBED} if cfg.tie_word_embeddings else {}

    def unused_tensors(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Tensors a checkpoint may hold that the model does not use (none for Llama)."""
        return {}

    def is_ignored(self, name: str) -> bool:
        return name.endswith(IGNORED_SUFFIXES)

    def convert(self, read: TensorReader, cfg: ModelConfig, dtype: Any) -> LlamaWeights:
        """Read every tensor of ``tensor_shapes(cfg)`` once and build LlamaWeights in ``dtype``."""
        embed = _on_device(read(EMBED), dtype)
        lm_head = None if cfg.tie_word_embeddings else _on_device(read(LM_HEAD), dtype).T
        final_norm = _on_device(read(FINAL_NORM), dtype)
        layers = tuple(LayerWeights(**layer_fields(read, cfg, i, dtype))
                       for i in range(cfg.num_layers))
        return LlamaWeights(embed=embed, final_norm=final_norm, layers=layers, lm_head=lm_head)

    # GGUF (llama.cpp) files.

    def hf_name_of_gguf(self, gguf_name: str) -> str | None:
        """The HF name of a llama GGUF tensor, or None if it has none."""
        if gguf_name in _GGUF_GLOBAL_NAMES:
            return _GGUF_GLOBAL_NAMES[gguf_name]
        m = _GGUF_BLOCK.fullmatch(gguf_name)
        if m and m.group(2) in _GGUF_LAYER_NAMES:
            return f"{layer_prefix(int(m.group(1)))}{_GGUF_LAYER_NAMES[m.group(2)]}"
        return None

    def gguf_name_of_hf(self, hf_name: str) -> str | None:
        """The llama GGUF name of an HF tensor name, or None if it has none."""
        for g, h in _GGUF_GLOBAL_NAMES.items():
            if h == hf_name:
                return g
        m = _HF_BLOCK.fullmatch(hf_name)
        for g, h in _GGUF_LAYER_NAMES.items():
            if m and h == m.group(2):
                return f"blk.{int(m.group(1))}.{g}"
        return None

    def from_gguf(self, gguf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """A dequantised torch-layout GGUF tensor in HF's row order."""
        if ".attn_q." in gguf_name:
            return unpermute_rotary_rows(w, cfg.num_heads)
        if ".attn_k." in gguf_name:
            return unpermute_rotary_rows(w, cfg.num_kv_heads)
        return w

    def gguf_rope_parameters(self, rope_freqs: np.ndarray, hf: Mapping[str, Any],
                             original_context: int | None) -> dict[str, Any]:
        """HF ``rope_parameters`` of llama.cpp's ``rope_freqs`` tensor (Llama-3 rope scaling).

        ``hf`` is the rest of the HF config dict; ConfigError unless ``rope_freqs`` is the
        Llama-3 scaling of that config.
        """
        original = int(original_context or 8192)
        theta = hf["rope_parameters"]["rope_theta"]
        rope = {"rope_type": "llama3", "rope_theta": theta,
                "factor": float(rope_freqs.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": original}
        scaled = ModelConfig.from_hf_dict({**hf, "rope_parameters": rope})
        plain = ModelConfig.from_hf_dict({**hf, "rope_parameters": {"rope_theta": theta}})
        expected = inverse_frequencies(plain) / inverse_frequencies(scaled)
        if rope_freqs.shape != expected.shape or not np.allclose(rope_freqs, expected, rtol=1e-4):
            raise ConfigError(
                f"rope_freqs.weight does not match Llama-3 rope scaling (factor "
                f"{rope['factor']}, low/high frequency factors 1/4, original context {original}); "
                "this rope scaling is not supported")
        return rope


LAYOUT = LlamaLayout()


def _on_device(x: Any, dtype: Any) -> jax.Array:
    return jnp.asarray(x).astype(dtype)


def layer_tensor_shapes(cfg: ModelConfig, i: int, *, q_proj: str = Q_PROJ, with_kv: bool = True
                        ) -> dict[str, tuple[int, ...]]:
    """Torch-layout shapes of layer ``i``'s tensors; ``q_proj`` names its query projection,
    ``with_kv`` False leaves out its k/v projections."""
    H, N, K, D, I = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    p = layer_prefix(i)
    shapes = {
        p + "input_layernorm.weight": (H,),
        p + "post_attention_layernorm.weight": (H,),
        p + q_proj + ".weight": (N * D, H),
        p + "self_attn.o_proj.weight": (H, N * D),
        p + "mlp.gate_proj.weight": (I, H),
        p + "mlp.up_proj.weight": (I, H),
        p + "mlp.down_proj.weight": (H, I),
    }
    if with_kv:
        shapes.update({p + "self_attn.k_proj.weight": (K * D, H),
                       p + "self_attn.v_proj.weight": (K * D, H)})
    if cfg.attention_bias:
        shapes.update({p + q_proj + ".bias": (N * D,), p + "self_attn.o_proj.bias": (H,)})
        if with_kv:
            shapes.update({p + "self_attn.k_proj.bias": (K * D,),
                           p + "self_attn.v_proj.bias": (K * D,)})
    if cfg.mlp_bias:
        shapes.update({
            p + "mlp.gate_proj.bias": (I,),
            p + "mlp.up_proj.bias": (I,),
            p + "mlp.down_proj.bias": (H,),
        })
    return shapes


def kv_projection(read: TensorReader, cfg: ModelConfig, prefix: str, dtype: Any
                  ) -> tuple[jax.Array, jax.Array | None]:
    """A k and a v projection stacked: weight [H, 2, K, D], bias [2, K, D] (None without
    ``attention_bias``). ``prefix`` is the tensors' name with ``{}`` for ``k`` / ``v``
    (``model.layers.3.self_attn.{}_proj``)."""
    H, K, D = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim

    def get(name: str) -> jax.Array:
        return _on_device(read(name), dtype)

    weight = jnp.stack([get(prefix.format("k") + ".weight").T.reshape(H, K, D),
                        get(prefix.format("v") + ".weight").T.reshape(H, K, D)], axis=1)
    bias = None
    if cfg.attention_bias:
        bias = jnp.stack([get(prefix.format("k") + ".bias").reshape(K, D),
                          get(prefix.format("v") + ".bias").reshape(K, D)], axis=0)
    return weight, bias


def layer_fields(read: TensorReader, cfg: ModelConfig, i: int, dtype: Any, *, q_proj: str = Q_PROJ,
                 with_kv: bool = True) -> dict[str, Any]:
    """Layer ``i``'s tensors converted to ``LayerWeights`` fields in ``dtype`` (the k/v fields
    only ``with_kv``; the query projection read from ``q_proj``)."""
    H, N, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    p = layer_prefix(i)

    def get(name: str) -> jax.Array:
        return _on_device(read(p + name), dtype)

    fields: dict[str, Any] = {
        "input_norm": get("input_layernorm.weight"),
        "post_norm": get("post_attention_layernorm.weight"),
        "q_proj": get(q_proj + ".weight").T.reshape(H, N, D),
        "o_proj": get("self_attn.o_proj.weight").T.reshape(N, D, H),
        "gate_up": jnp.stack([get("mlp.gate_proj.weight").T, get("mlp.up_proj.weight").T], axis=1),
        "down": get("mlp.down_proj.weight").T,
    }
    if with_kv:
        fields["kv_proj"], kv_bias = kv_projection(read, cfg, p + "self_attn.{}_proj", dtype)
        if kv_bias is not None:
            fields["kv_bias"] = kv_bias
    if cfg.attention_bias:
        fields["q_bias"] = get(q_proj + ".bias").reshape(N, D)
        fields["o_bias"] = get("self_attn.o_proj.bias")
    if cfg.mlp_bias:
        fields["gate_up_bias"] = jnp.stack([get("mlp.gate_proj.bias"), get("mlp.up_proj.bias")],
                                           axis=0)
        fields["down_bias"] = get("mlp.down_proj.bias")
    return fields
