"""The configuration of a BERT-family encoder, read from a Hugging Face ``config.json``.

Post-LN encoder with absolute position embeddings and token types (``BertModel``).
Not a ``ModelConfig``: an encoder has no KV cache, rotary embeddings or LM head.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from arctic_jax.config import ConfigError

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
"""``hidden_act`` values: exact-erf GELU, the tanh approximation (two HF names), ReLU."""

TENSOR_PREFIXES = ("", "bert.")
"""``BertModel`` checkpoints name their tensors bare; the ``BertFor*`` heads prefix them."""

_PREFIXED_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shapes and constants of a BERT encoder.

    ``tensor_prefix``: the prefix of the checkpoint's tensor names (``"bert."`` for a
    ``BertForMaskedLM`` checkpoint, else ``""``).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int | None = 0
    tensor_prefix: str = ""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) is not a multiple of "
                              f"num_attention_heads ({self.num_heads})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: "
                              f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if not (isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0):
            raise ConfigError(f"layer_norm_eps must be a positive number, got "
                              f"{self.layer_norm_eps!r}")
        if self.tensor_prefix not in TENSOR_PREFIXES:
            raise ConfigError(f"tensor_prefix must be one of {TENSOR_PREFIXES}, got "
                              f"{self.tensor_prefix!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """Build from an HF ``config.json`` dict of a ``bert`` model.

        The shape fields are required; the others default as in transformers' BertConfig.
        ConfigError for relative position embeddings, a decoder (causal) BERT, or an
        unsupported activation.
        """
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config.json has no {', '.join(map(repr, missing))}")
        position_type = d.get("position_embedding_type", "absolute")
        if position_type not in (None, "absolute"):
            raise ConfigError(f"unsupported position_embedding_type {position_type!r}; "
                              "only 'absolute' is supported")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ConfigError("decoder BERT configs (is_decoder / add_cross_attention) are not "
                              "supported; only bidirectional encoders are")
        archs = tuple(d.get("architectures") or ())
        prefix = "bert." if set(archs) & set(_PREFIXED_ARCHITECTURES) else ""
        eps = d.get("layer_norm_eps", 1e-12)
        return cls(
            vocab_size=_int(d, "vocab_size"),
            hidden_size=_int(d, "hidden_size"),
            num_layers=_int(d, "num_hidden_layers"),
            num_heads=_int(d, "num_attention_heads"),
            intermediate_size=_int(d, "intermediate_size"),
            max_position_embeddings=_int(d, "max_position_embeddings", 512),
            type_vocab_size=_int(d, "type_vocab_size", 2),
            layer_norm_eps=float(eps) if isinstance(eps, (int, float)) else eps,
            hidden_act=d.get("hidden_act", "gelu"),
            pad_token_id=d.get("pad_token_id", 0),
            tensor_prefix=prefix,
        )


def _int(d: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field {key} must be an integer, got {value!r}")
    return value
