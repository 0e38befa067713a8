"""Write a distilled SwiftKV model as an HF checkpoint in Snowflake's layout.

The directory gets:

- ``config.json``: every field of the teacher's HF config (its own ``config.json``, or one built
  from its ``ModelConfig`` for a GGUF teacher) with ``architectures``
  ``["LlamaSwiftKVForCausalLM"]``, ``model_type`` ``llama_swiftkv``, ``swiftkv: true``,
  ``num_key_value_layers``, ``key_value_group_size`` and ``torch_dtype``;
- ``model.safetensors`` (torch layout, the weights' dtype): all the teacher's tensors, the
  later layers' q/k/v projections too (as Snowflake's files keep them; the loader skips
  them), plus ``model.norm_swiftkv.weight``, ``q_proj_swiftkv`` of layers >= Lkv and
  ``k/v_proj_swiftkv`` of layers Lkv, Lkv + g, ... (biases with ``attention_bias``);
- the tokenizer files (``save_pretrained`` of the teacher's tokenizer, chat template included).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from arctic_jax.config import ModelConfig, RopeScaling
from arctic_jax.models.registry import LLAMA, SWIFTKV

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = SWIFTKV.architectures[0]
MODEL_TYPE = SWIFTKV.model_types[0]


def _np(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x))


def llama_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` fields of a Llama model with config ``cfg``."""
    rs = cfg.rope_scaling
    rope: dict[str, Any] = {"rope_type": rs.rope_type, "rope_theta": cfg.rope_theta}
    if rs.rope_type != "default":
        rope.update(factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    return {"architectures": list(LLAMA.architectures), "model_type": LLAMA.model_types[0],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": rope,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
            "mlp_bias": cfg.mlp_bias, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": list(cfg.eos_token_ids)}


def _comparable(cfg: ModelConfig) -> ModelConfig:
    """``cfg``'s Llama fields, with the unused scaling fields of default RoPE cleared."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    if cfg.rope_scaling.rope_type == "default":
        fields["rope_scaling"] = RopeScaling()
    return ModelConfig(**fields)


def teacher_hf_config(source: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
    """The teacher's HF config: ``source/config.json`` when ``source`` is an HF checkpoint
    directory, else (a GGUF file) the fields of ``cfg``. ValueError unless it describes ``cfg``."""
    path = os.path.join(source, CONFIG_FILE)
    if os.path.isdir(source) and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    else:
        d = llama_hf_config(cfg)
    if _comparable(ModelConfig.from_hf_dict(d)) != _comparable(cfg):
        raise ValueError(f"the teacher's HF config ({path if os.path.isfile(path) else 'built'}) "
                         f"does not describe the loaded teacher model")
    return d


def swiftkv_hf_config(teacher_hf: dict[str, Any], cfg: Any, dtype: Any) -> dict[str, Any]:
    """The student's ``config.json``: the teacher's fields plus the SwiftKV ones."""
    return {**teacher_hf, "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
            **cfg.to_hf_dict(), "torch_dtype": np.dtype(dtype).name}


def _layer_tensors(cfg: ModelConfig, i: int, layer: Any, *, with_qkv: bool) -> dict[str, np.ndarray]:
    """Layer ``i`` of LlamaWeights (or LateLayerWeights: ``with_qkv`` False) in torch layout,
    under its HF names (q/k/v only ``with_qkv``)."""
    H, N, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = f"model.layers.{i}."
    out = {p + "input_layernorm.weight": _np(layer.input_norm),
           p + "post_attention_layernorm.weight": _np(layer.post_norm),
           p + "self_attn.o_proj.weight": _np(layer.o_proj).reshape(N * D, H).T,
           p + "mlp.gate_proj.weight": _np(layer.gate_up)[:, 0].T,
           p + "mlp.up_proj.weight": _np(layer.gate_up)[:, 1].T,
           p + "mlp.down_proj.weight": _np(layer.down).T}
    if with_qkv:
        kv = _np(layer.kv_proj)
        out.update({p + "self_attn.q_proj.weight": _np(layer.q_proj).reshape(H, N * D).T,
                    p + "self_attn.k_proj.weight": kv[:, 0].reshape(H, K * D).T,
                    p + "self_attn.v_proj.weight": kv[:, 1].reshape(H, K * D).T})
        if cfg.attention_bias:
            out.update({p + "self_attn.q_proj.bias": _np(layer.q_bias).reshape(N * D),
                        p + "self_attn.k_proj.bias": _np(layer.kv_bias)[0].reshape(K * D),
                        p + "self_attn.v_proj.bias": _np(layer.kv_bias)[1].reshape(K * D)})
    if cfg.attention_bias:
        out[p + "self_attn.o_proj.bias"] = _np(layer.o_bias)
    if cfg.mlp_bias:
        out.update({p + "mlp.gate_proj.bias": _np(layer.gate_up_bias)[0],
                    p + "mlp.up_proj.bias": _np(layer.gate_up_bias)[1],
                    p + "mlp.down_proj.bias": _np(layer.down_bias)})
    return out


def swiftkv_tensors(cfg: Any, teacher: Any, student: Any) -> dict[str, np.ndarray]:
    """Torch-layout tensors of the checkpoint: the teacher's (``LlamaWeights``, all L layers) and
    the student's SwiftKV ones (``SwiftKVWeights``). ValueError unless the names and shapes are
    exactly those the SwiftKV layout requires plus the teacher's later q/k/v."""
    H, N, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    Lkv, g = cfg.num_key_value_layers, cfg.key_value_group_size
    out = {"model.embed_tokens.weight": _np(teacher.embed), "model.norm.weight": _np(teacher.final_norm),
           "model.norm_swiftkv.weight": _np(student.norm_swiftkv)}
    if teacher.lm_head is not None:
        out["lm_head.weight"] = _np(teacher.lm_head).T
    for i, layer in enumerate(teacher.layers):
        out.update(_layer_tensors(cfg, i, layer, with_qkv=True))
    fanout = _np(student.kv_fanout)
    fanout_bias = None if student.kv_fanout_bias is None else _np(student.kv_fanout_bias)
    for j, layer in enumerate(student.late_layers):
        i = Lkv + j
        p = f"model.layers.{i}.self_attn."
        out[p + "q_proj_swiftkv.weight"] = _np(layer.q_proj).reshape(H, N * D).T
        if cfg.attention_bias:
            out[p + "q_proj_swiftkv.bias"] = _np(layer.q_bias).reshape(N * D)
        if j % g == 0:
            for c, name in enumerate("kv"):
                out[p + f"{name}_proj_swiftkv.weight"] = fanout[:, j // g, c].reshape(H, K * D).T
                if fanout_bias is not None:
                    out[p + f"{name}_proj_swiftkv.bias"] = fanout_bias[j // g, c].reshape(K * D)
    out = {n: np.ascontiguousarray(a) for n, a in out.items()}
    layout = SWIFTKV.layout
    want = {**layout.tensor_shapes(cfg), **layout.unused_tensors(cfg)}
    got = {n: tuple(a.shape) for n, a in out.items()}
    if got != want:
        wrong = sorted(set(got) ^ set(want)) + sorted(n for n in set(got) & set(want)
                                                      if got[n] != want[n])
        raise ValueError(f"the SwiftKV tensors do not match the layout: {', '.join(wrong[:8])}")
    return out


def check_output_dir(directory: str | os.PathLike) -> Path:
    """``directory`` as a Path; ValueError if it exists and is not an empty directory."""
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--output {out} exists and is not an empty directory")
    return out


def save_swiftkv_checkpoint(directory: str | os.PathLike, cfg: Any, teacher_hf: dict[str, Any],
                            teacher: Any, student: Any, tokenizer: Any = None) -> Path:
    """Write the checkpoint (see the module docstring) to the new or empty ``directory``, in the
    student weights' dtype; ``tokenizer`` (an HF tokenizer) is saved beside it when given.
    Returns the weights file's path."""
    from safetensors.numpy import save_file

    out = check_output_dir(directory)
    SWIFTKV.validate_weights(student, cfg)
    tensors = swiftkv_tensors(cfg, teacher, student)
    dtype = np.asarray(student.embed).dtype
    tensors = {n: a.astype(dtype) for n, a in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(swiftkv_hf_config(teacher_hf, cfg, dtype), f, indent=2)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out / WEIGHTS_FILE
