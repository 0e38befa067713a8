"""Read a GGUF file (llama.cpp format) of a registered model with the ``gguf`` package.

The model is the registered one whose model_type is the file's
``general.architecture`` (``arctic_jax.models.registry``). The config comes
from the ``<arch>.*`` and ``tokenizer.ggml.*`` metadata; tensors are
dequantised with ``gguf.quants.dequantize`` to float32 in torch layout (numpy
shape = GGUF dims reversed = ``[out, in]``), renamed to their HF names,
rearranged as HF stores them and converted, all by the model's layout. A tied
model has no ``output.weight``. A ``rope_freqs.weight`` tensor (how llama.cpp
stores some rope scalings) is recognised by the layout, or rejected.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models import registry
from checkpoints import hf_layout
from checkpoints.errors import CheckpointError

ROPE_FREQS = "rope_freqs.weight"


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


def spec_from_reader(reader: Any, path: str) -> registry.ModelSpec:
    """The registered model whose model_type is the file's ``general.architecture``."""
    arch = _metadata(reader, "general.architecture")
    try:
        return registry.spec_for_hf_config({"model_type": arch})
    except ConfigError:
        supported = [t for spec in registry.registered_specs() for t in spec.model_types]
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; "
                          f"supported: {', '.join(supported)}") from None


def config_from_reader(reader: Any, path: str) -> tuple[registry.ModelSpec, ModelConfig]:
    """The model spec and ModelConfig of GGUF metadata; ConfigError for models arctic-jax
    cannot serve."""
    spec = spec_from_reader(reader, path)
    arch = _metadata(reader, "general.architecture")
    if int(_metadata(reader, "split.count", 1) or 1) > 1:
        raise CheckpointError(f"{path} is one part of a split GGUF; merge the parts first")

    def meta(key: str, default: Any = None, required: bool = False) -> Any:
        value = _metadata(reader, f"{arch}.{key}", default)
        if required and value is None:
            raise ConfigError(f"{path}: GGUF metadata has no {arch}.{key}")
        return value

    if int(meta("expert_count", 0) or 0) > 0:
        raise ConfigError(f"{path}: mixture-of-experts {arch} models are not supported")
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(meta("embedding_length", required=True))
    heads = int(meta("attention.head_count", required=True))
    head_dim = int(meta("attention.key_length", 0) or hidden // heads)
    for key in ("attention.value_length", "rope.dimension_count"):
        value = meta(key)
        if value is not None and int(value) != head_dim:
            raise ConfigError(f"{path}: {arch}.{key} = {value} differs from head_dim {head_dim} "
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
        "architectures": list(spec.architectures[:1]), "model_type": arch,
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
            hf["rope_parameters"] = spec.layout.gguf_rope_parameters(
                _dequantize(tensors[ROPE_FREQS]), hf,
                meta("rope.scaling.original_context_length"))
        return spec, spec.parse_config(hf)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(path) else f"{path}: {msg}") from e


def read_gguf_spec(path: str | os.PathLike) -> registry.ModelSpec:
    """The registered model of a GGUF file (from its metadata only)."""
    path = os.fspath(path)
    return spec_from_reader(open_gguf(path), path)


def read_gguf_config(path: str | os.PathLike) -> tuple[registry.ModelSpec, ModelConfig]:
    path = os.fspath(path)
    return config_from_reader(open_gguf(path), path)


def load_gguf(path: str | os.PathLike, dtype: Any, *, progress: bool = True
              ) -> tuple[ModelConfig, Any]:
    """Config and weights pytree (in ``dtype``) of a GGUF file.

    Raises CheckpointError for damaged files and missing, unexpected or
    misshaped tensors (named by their GGUF names), ConfigError for models
    arctic-jax cannot serve.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    spec, cfg = config_from_reader(reader, path)
    layout = spec.layout
    by_hf: dict[str, Any] = {}
    gguf_of: dict[str, str] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue  # consumed by config_from_reader
        key = layout.hf_name_of_gguf(t.name) or t.name
        by_hf[key], gguf_of[key] = t, t.name
    hf_layout.check_tensors(layout, {k: _tensor_shape(t) for k, t in by_hf.items()}, cfg,
                            where=path, label=lambda n: gguf_of.get(n) or layout.gguf_name_of_hf(n) or n)

    def read(name: str) -> np.ndarray:
        t = by_hf[name]
        return layout.from_gguf(t.name, _dequantize(t), cfg)

    weights = hf_layout.convert_weights(
        layout, read, by_hf.keys(), cfg, dtype, desc=f"converting {os.path.basename(path)}",
        progress=progress)
    return cfg, weights
