"""Read a llama-architecture GGUF file (llama.cpp format) with the ``gguf`` package.

The config comes from the ``llama.*`` and ``tokenizer.ggml.*`` metadata;
tensors are dequantised with ``gguf.quants.dequantize`` to float32 in torch
layout (numpy shape = GGUF dims reversed = ``[out, in]``), renamed to their HF
names and converted by ``checkpoints.hf_layout``. llama.cpp stores the rows of
``attn_q``/``attn_k`` (weights and biases) in an interleaved rotary order; they
are put back in HF's "rotate half" order here. A tied model has no
``output.weight``. Llama-3 rope scaling, which llama.cpp stores as a
``rope_freqs.weight`` tensor, is recognised by recomputing that tensor.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models.llama_weights import LlamaWeights
from arctic_jax.models.rope import inverse_frequencies
from checkpoints import hf_layout
from checkpoints.errors import CheckpointError

ARCH = "llama"
ROPE_FREQS = "rope_freqs.weight"

_GLOBAL_NAMES = {
    "token_embd.weight": hf_layout.EMBED,
    "output_norm.weight": hf_layout.FINAL_NORM,
    "output.weight": hf_layout.LM_HEAD,
}
_LAYER_NAMES = {
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
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a llama GGUF tensor, or None if it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    return None


def gguf_name(hf: str) -> str | None:
    """The llama GGUF tensor name of an HF tensor name, or None if it has none."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    for g, h in _LAYER_NAMES.items():
        if m and h == m.group(2):
            return f"blk.{int(m.group(1))}.{g}"
    return None


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation of a torch-layout [rows, ...] tensor."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"{rows} rows cannot be split into {n_heads} rotary heads")
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def open_gguf(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` for ``path``; CheckpointError names a truncated or corrupt file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails with assorted errors on damaged files
        raise CheckpointError(f"{path} is truncated or not a valid GGUF file: {e!r}") from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name} ends at byte "
                f"{int(t.data_offset) + int(t.n_bytes)}, the file has {size}")
    return reader


def _metadata(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar metadata value (str, int, float or bool), or ``default`` if absent."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        raise ConfigError(f"GGUF metadata {key} is an array; a single value is expected")
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def _array_length(reader: Any, key: str) -> int | None:
    field = reader.fields.get(key)
    return None if field is None else len(field.data)


def _tensor_shape(t: Any) -> tuple[int, ...]:
    """Torch-layout shape of a GGUF tensor (its GGUF dims reversed)."""
    return tuple(int(d) for d in reversed(t.shape))


def _dequantize(t: Any) -> np.ndarray:
    from gguf.quants import dequantize

    out = np.asarray(dequantize(t.data, t.tensor_type))
    shape = _tensor_shape(t)
    if out.size != int(np.prod(shape)):
        raise CheckpointError(f"tensor {t.name}: {out.size} values after dequantising, "
                              f"expected {int(np.prod(shape))} for shape {shape}")
    return out.reshape(shape)


def _llama3_rope(rope_freqs: np.ndarray, hf: dict[str, Any], path: str) -> dict[str, Any]:
    """Recognise llama.cpp's ``rope_freqs`` as Llama-3 rope scaling, or raise ConfigError."""
    original = int(hf.pop("_original_context_length", None) or 8192)
    rope = {"rope_type": "llama3", "rope_theta": hf["rope_parameters"]["rope_theta"],
            "factor": float(rope_freqs.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}
    cfg = ModelConfig.from_hf_dict({**hf, "rope_parameters": rope})
    plain = ModelConfig.from_hf_dict({**hf, "rope_parameters": {"rope_theta": rope["rope_theta"]}})
    expected = inverse_frequencies(plain) / inverse_frequencies(cfg)
    if rope_freqs.shape != expected.shape or not np.allclose(rope_freqs, expected, rtol=1e-4):
        raise ConfigError(
            f"{path}: {ROPE_FREQS} does not match Llama-3 rope scaling (factor "
            f"{rope['factor']}, low/high frequency factors 1/4, original context {original}); "
            "this rope scaling is not supported")
    return rope


def config_from_reader(reader: Any, path: str) -> ModelConfig:
    """ModelConfig from GGUF metadata; ConfigError for anything but a dense llama model."""
    arch = _metadata(reader, "general.architecture")
    if arch != ARCH:
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {ARCH}")
    if int(_metadata(reader, "split.count", 1) or 1) > 1:
        raise CheckpointError(f"{path} is one part of a split GGUF; merge the parts first")

    def meta(key: str, default: Any = None, required: bool = False) -> Any:
        value = _metadata(reader, f"{ARCH}.{key}", default)
        if required and value is None:
            raise ConfigError(f"{path}: GGUF metadata has no {ARCH}.{key}")
        return value

    if int(meta("expert_count", 0) or 0) > 0:
        raise ConfigError(f"{path}: mixture-of-experts llama models are not supported")
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(meta("embedding_length", required=True))
    heads = int(meta("attention.head_count", required=True))
    head_dim = int(meta("attention.key_length", 0) or hidden // heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        value = meta(key)
        if value is not None and int(value) != head_dim:
            raise ConfigError(f"{path}: {ARCH}.{key} = {value} differs from head_dim {head_dim} "
                              "(partial rotary or unequal K/V dims are not supported)")
    vocab = (meta("vocab_size") or _array_length(reader, "tokenizer.ggml.tokens")
             or (_tensor_shape(tensors["token_embd.weight"])[0]
                 if "token_embd.weight" in tensors else None))
    if vocab is None:
        raise ConfigError(f"{path}: cannot tell the vocabulary size")
    rope_params: dict[str, Any] = {"rope_theta": float(meta("rope.freq_base", 10000.0))}
    scaling = meta("rope.scaling.type")
    if scaling not in (None, "none"):
        rope_params.update(rope_type=scaling, factor=float(meta("rope.scaling.factor", 1.0)))
    eos = [_metadata(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos_ids = list(dict.fromkeys(int(e) for e in eos if e is not None))
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length", required=True)),
        "num_hidden_layers": int(meta("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": rope_params,
        "max_position_embeddings": int(meta("context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
        "bos_token_id": _metadata(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids,
    }
    try:
        if ROPE_FREQS in tensors:
            hf["_original_context_length"] = meta("rope.scaling.original_context_length")
            hf["rope_parameters"] = _llama3_rope(_dequantize(tensors[ROPE_FREQS]), hf, path)
        return ModelConfig.from_hf_dict(hf)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(path) else f"{path}: {msg}") from e


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    path = os.fspath(path)
    return config_from_reader(open_gguf(path), path)


def load_gguf(path: str | os.PathLike, dtype: Any, *, progress: bool = True
              ) -> tuple[ModelConfig, LlamaWeights]:
    """Config and weights (in ``dtype``) of a llama GGUF file.

    Raises CheckpointError for damaged files and missing, unexpected or
    misshaped tensors (named by their GGUF names), ConfigError for models
    arctic-jax cannot serve.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    cfg = config_from_reader(reader, path)
    by_hf: dict[str, Any] = {}
    gguf_of: dict[str, str] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # consumed by config_from_reader
        key = hf_name(t.name) or t.name
        by_hf[key], gguf_of[key] = t, t.name
    hf_layout.check_tensors({k: _tensor_shape(t) for k, t in by_hf.items()}, cfg, where=path,
                            label=lambda n: gguf_of.get(n) or gguf_name(n) or n)

    def read(name: str) -> np.ndarray:
        t = by_hf[name]
        w = _dequantize(t)
        if ".attn_q." in t.name:
            w = unpermute_rotary_rows(w, cfg.num_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rotary_rows(w, cfg.num_kv_heads)
        return w

    weights = hf_layout.convert_weights(
        read, cfg, dtype, has_lm_head=hf_layout.LM_HEAD in by_hf, total=len(by_hf),
        desc=f"converting {os.path.basename(path)}", progress=progress)
    return cfg, weights
