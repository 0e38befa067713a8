"""The model registry: a checkpoint's HF ``architectures`` / ``model_type`` -> its ``ModelSpec``.

A ``ModelSpec`` is everything the layers above the models (checkpoints,
sharding, engine) need to know about a model family, so that none of them
imports a model module by name. The table is built here at import (Llama, SwiftKV Llama, BERT);
``register`` / ``unregister`` add and remove entries explicitly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.models import (
    bert,
    bert_config,
    bert_layout,
    bert_weights,
    llama,
    llama_layout,
    llama_weights,
    swiftkv,
    swiftkv_config,
    swiftkv_layout,
    swiftkv_weights,
)


class CheckpointLayout(Protocol):
    """What the generic checkpoint readers need to know about a model's tensors.

    Tensors are named by their HF names and are in torch ``nn.Linear`` layout.
    """

    def tensor_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint for ``cfg`` must hold, with its shape."""
        ...

    def tied_tensors(self, cfg: ModelConfig) -> dict[str, str]:
        """Tensors that may also be present, each mapped to the tensor it must equal."""
        ...

    def unused_tensors(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Tensors (with their shapes) a checkpoint may also hold that the model does not read;
        the readers check their shapes and log them as skipped."""
        ...

    def is_ignored(self, name: str) -> bool:
        """Whether ``name`` is a buffer that holds no weights (skipped by the readers)."""
        ...

    def convert(self, read: Callable[[str], Any], cfg: ModelConfig, dtype: Any) -> Any:
        """The weights pytree in ``dtype``, reading each tensor of ``tensor_shapes`` once."""
        ...

    def hf_name_of_gguf(self, gguf_name: str) -> str | None:
        ...

    def gguf_name_of_hf(self, hf_name: str) -> str | None:
        ...

    def from_gguf(self, gguf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """A dequantised torch-layout GGUF tensor, rearranged as its HF counterpart."""
        ...

    def gguf_rope_parameters(self, rope_freqs: np.ndarray, hf: Mapping[str, Any],
                             original_context: int | None) -> dict[str, Any]:
        """HF ``rope_parameters`` recognised from a GGUF ``rope_freqs`` tensor, or ConfigError."""
        ...


TASKS = ("generate", "embed")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model family.

    - ``parse_config(hf_config_dict) -> ModelConfig``
    - ``weights_class``: the weights pytree dataclass; its fields declare their logical axes
    - ``step(weights, kv_cache, batch, *, cfg, opts) -> (hidden [R, H], kv_cache)``
    - ``head(weights, hidden, *, cfg, sharding=None) -> logits [R, V] float32``
    - ``random_weights(cfg, key, dtype=float32, scale=0.02) -> weights``
    - ``validate_weights(weights, cfg)``: ValueError naming any field that disagrees with cfg
    - ``config_class``: the config class ``parse_config`` returns (a ModelConfig for decoders)
    - ``task``: "generate" (a decoder: ``step`` + ``head``) or "embed" (an encoder:
      ``step(weights, batch: EncoderBatch, *, cfg, attention_impl) -> hidden [T, H]``)
    - ``quantize(weights, method) -> weights``: the weights with quantised matmuls (``method``
      e.g. "fp8"), or None where the family has none
    """

    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    parse_config: Callable[[Mapping[str, Any]], ModelConfig]
    weights_class: type
    step: Callable[..., Any]
    head: Callable[..., Any]
    layout: CheckpointLayout
    random_weights: Callable[..., Any]
    validate_weights: Callable[[Any, ModelConfig], None]
    config_class: type = ModelConfig
    task: str = "generate"
    quantize: Callable[[Any, str], Any] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"model {self.name!r}: task {self.task!r} is not one of {TASKS}")


LLAMA = ModelSpec(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    parse_config=ModelConfig.from_hf_dict,
    weights_class=llama_weights.LlamaWeights,
    step=llama.step,
    head=llama.head,
    layout=llama_layout.LAYOUT,
    random_weights=llama_weights.random_weights,
    validate_weights=llama_weights.validate_weights,
)

SWIFTKV = ModelSpec(
    name="llama_swiftkv",
    architectures=("LlamaSwiftKVForCausalLM",),
    model_types=("llama_swiftkv",),
    parse_config=swiftkv_config.SwiftKVConfig.from_hf_dict,
    weights_class=swiftkv_weights.SwiftKVWeights,
    step=swiftkv.step,
    head=llama.head,
    layout=swiftkv_layout.LAYOUT,
    random_weights=swiftkv_weights.random_weights,
    validate_weights=swiftkv_weights.validate_weights,
    config_class=swiftkv_config.SwiftKVConfig,
)

BERT = ModelSpec(
    name="bert",
    architectures=("BertModel", "BertForMaskedLM"),
    model_types=("bert",),
    parse_config=bert_config.BertConfig.from_hf_dict,
    weights_class=bert_weights.BertWeights,
    step=bert.encode,
    head=bert.head,
    layout=bert_layout.LAYOUT,
    random_weights=bert_weights.random_weights,
    validate_weights=bert_weights.validate_weights,
    config_class=bert_config.BertConfig,
    task="embed",
    quantize=bert_weights.quantize_weights,
)

_SPECS: dict[str, ModelSpec] = {LLAMA.name: LLAMA, SWIFTKV.name: SWIFTKV, BERT.name: BERT}


def registered_specs() -> tuple[ModelSpec, ...]:
    return tuple(_SPECS.values())


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec``; ValueError if its name, an architecture or a model_type is taken."""
    for other in _SPECS.values():
        clash = (({other.name} & {spec.name}) | (set(other.architectures) & set(spec.architectures))
                 | (set(other.model_types) & set(spec.model_types)))
        if clash:
            raise ValueError(f"model {spec.name!r}: {', '.join(sorted(clash))} already "
                             f"registered by model {other.name!r}")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the spec called ``name`` (KeyError if there is none)."""
    del _SPECS[name]


def spec_by_name(name: str) -> ModelSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(_SPECS)}") from None


def _registered() -> str:
    archs = [a for s in _SPECS.values() for a in s.architectures]
    types = [t for s in _SPECS.values() for t in s.model_types]
    return f"registered architectures: {', '.join(archs)} (model types: {', '.join(types)})"


def spec_for_hf_config(d: Mapping[str, Any]) -> ModelSpec:
    """The spec of an HF ``config.json`` dict: by ``architectures`` if it names any, else by
    ``model_type``. ConfigError for an unregistered one, or a model_type that contradicts the
    architecture."""
    archs = tuple(d.get("architectures") or ())
    model_type = d.get("model_type")
    if archs:
        matches = [s for s in _SPECS.values() if set(archs) & set(s.architectures)]
        if not matches:
            raise ConfigError(f"unsupported architecture {', '.join(map(str, archs))}; "
                              f"{_registered()}")
        spec = matches[0]
        if model_type is not None and model_type not in spec.model_types:
            raise ConfigError(
                f"model_type {model_type!r} does not match architecture "
                f"{', '.join(map(str, archs))} (model {spec.name!r} has model types "
                f"{', '.join(spec.model_types)})")
        return spec
    for spec in _SPECS.values():
        if model_type in spec.model_types:
            return spec
    raise ConfigError(f"unsupported model_type {model_type!r}; {_registered()}")
