"""Hugging Face Llama tensor names and their conversion into ``LlamaWeights``.

Both loaders present tensors under their HF names in torch ``nn.Linear``
layout (``[out, in]``); this module checks names and shapes against the config
and converts each tensor, on the device, into the layout of
``arctic_jax.models.llama_weights``:

- ``q_proj.weight`` [N*D, H]              -> ``q_proj`` [H, N, D]
- ``k_proj/v_proj.weight`` [K*D, H] each  -> ``kv_proj`` [H, 2, K, D]
- ``o_proj.weight`` [H, N*D]              -> ``o_proj`` [N, D, H]
- ``gate_proj/up_proj.weight`` [I, H]     -> ``gate_up`` [H, 2, I]
- ``down_proj.weight`` [H, I]             -> ``down`` [I, H]
- ``embed_tokens.weight`` [V, H]          -> ``embed`` [V, H]
- ``lm_head.weight`` [V, H]               -> ``lm_head`` [H, V]

Tied embeddings: a tied checkpoint normally has no ``lm_head.weight``; if it
has one, it is accepted only when it is identical to ``embed_tokens.weight``.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from tqdm import tqdm

from arctic_jax.config import ModelConfig
from arctic_jax.models.llama_weights import LayerWeights, LlamaWeights
from checkpoints.errors import CheckpointError, tensor_mismatch_error

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Buffers some HF checkpoints carry that hold no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

Reader = Callable[[str], Any]
"""Reads one tensor by HF name, in torch layout (numpy or jax array)."""


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def is_ignored(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint for ``cfg`` must hold, in torch layout.

    ``lm_head.weight`` is listed only for untied configs (see module docstring).
    """
    H, N, K, D, I, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    shapes: dict[str, tuple[int, ...]] = {EMBED: (V, H), FINAL_NORM: (H,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (V, H)
    for i in range(cfg.num_layers):
        p = layer_prefix(i)
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (N * D, H),
            p + "self_attn.k_proj.weight": (K * D, H),
            p + "self_attn.v_proj.weight": (K * D, H),
            p + "self_attn.o_proj.weight": (H, N * D),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
        if cfg.attention_bias:
            shapes.update({
                p + "self_attn.q_proj.bias": (N * D,),
                p + "self_attn.k_proj.bias": (K * D,),
                p + "self_attn.v_proj.bias": (K * D,),
                p + "self_attn.o_proj.bias": (H,),
            })
        if cfg.mlp_bias:
            shapes.update({
                p + "mlp.gate_proj.bias": (I,),
                p + "mlp.up_proj.bias": (I,),
                p + "mlp.down_proj.bias": (H,),
            })
    return shapes


def check_tensors(found: Mapping[str, tuple[int, ...]], cfg: ModelConfig, where: str,
                  label: Callable[[str], str] = str) -> None:
    """Raise CheckpointError unless ``found`` (name -> shape) is exactly what ``cfg`` needs.

    Ignored buffers are skipped; ``label`` turns an HF name into the name shown
    in messages (e.g. the GGUF tensor name).
    """
    expected = hf_tensor_shapes(cfg)
    if cfg.tie_word_embeddings and LM_HEAD in found:
        expected[LM_HEAD] = expected[EMBED]  # allowed, checked equal to the embedding later
    present = {n: tuple(s) for n, s in found.items() if not is_ignored(n)}
    missing = [label(n) for n in expected if n not in present]
    unexpected = [label(n) for n in present if n not in expected]
    misshaped = [(label(n), expected[n], s) for n, s in present.items()
                 if n in expected and s != expected[n]]
    err = tensor_mismatch_error(where, missing=missing, unexpected=unexpected, misshaped=misshaped)
    if err is not None:
        raise err


def _on_device(x: Any, dtype: Any) -> jax.Array:
    return jnp.asarray(x).astype(dtype)


def convert_layer(read: Reader, cfg: ModelConfig, i: int, dtype: Any,
                  tick: Callable[[int], Any] = lambda n: None) -> LayerWeights:
    """Read layer ``i``'s tensors and convert them to a LayerWeights in ``dtype``."""
    H, N, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = layer_prefix(i)

    def get(name: str) -> jax.Array:
        out = _on_device(read(p + name), dtype)
        tick(1)
        return out

    fields: dict[str, Any] = {
        "input_norm": get("input_layernorm.weight"),
        "post_norm": get("post_attention_layernorm.weight"),
        "q_proj": get("self_attn.q_proj.weight").T.reshape(H, N, D),
        "kv_proj": jnp.stack([get("self_attn.k_proj.weight").T.reshape(H, K, D),
                              get("self_attn.v_proj.weight").T.reshape(H, K, D)], axis=1),
        "o_proj": get("self_attn.o_proj.weight").T.reshape(N, D, H),
        "gate_up": jnp.stack([get("mlp.gate_proj.weight").T, get("mlp.up_proj.weight").T], axis=1),
        "down": get("mlp.down_proj.weight").T,
    }
    if cfg.attention_bias:
        fields["q_bias"] = get("self_attn.q_proj.bias").reshape(N, D)
        fields["kv_bias"] = jnp.stack([get("self_attn.k_proj.bias").reshape(K, D),
                                       get("self_attn.v_proj.bias").reshape(K, D)], axis=0)
        fields["o_bias"] = get("self_attn.o_proj.bias")
    if cfg.mlp_bias:
        fields["gate_up_bias"] = jnp.stack([get("mlp.gate_proj.bias"), get("mlp.up_proj.bias")],
                                           axis=0)
        fields["down_bias"] = get("mlp.down_proj.bias")
    return LayerWeights(**fields)


def convert_weights(read: Reader, cfg: ModelConfig, dtype: Any, *, has_lm_head: bool,
                    total: int, desc: str, progress: bool = True) -> LlamaWeights:
    """Convert a checked checkpoint into LlamaWeights, one tensor at a time.

    ``total`` is the number of tensors to be read (for the progress bar on
    stderr, shown once a load takes more than a second).
    """
    with tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, delay=1.0,
              disable=not progress) as bar:
        embed_raw = jnp.asarray(read(EMBED))
        bar.update(1)
        lm_head = None
        if has_lm_head:
            head_raw = jnp.asarray(read(LM_HEAD))
            bar.update(1)
            if cfg.tie_word_embeddings:
                if (head_raw.shape != embed_raw.shape
                        or not bool(jnp.array_equal(head_raw, embed_raw))):
                    raise CheckpointError(
                        f"{desc}: the config ties word embeddings but {LM_HEAD} differs from "
                        f"{EMBED}; set tie_word_embeddings to false to use a separate lm_head")
            else:
                lm_head = head_raw.astype(dtype).T
            del head_raw
        embed = embed_raw.astype(dtype)
        del embed_raw
        final_norm = _on_device(read(FINAL_NORM), dtype)
        bar.update(1)
        layers = tuple(convert_layer(read, cfg, i, dtype, bar.update)
                       for i in range(cfg.num_layers))
    return LlamaWeights(embed=embed, final_norm=final_norm, layers=layers, lm_head=lm_head)
