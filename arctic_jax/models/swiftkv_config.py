"""The configuration of a SwiftKV Llama (Snowflake's ``llama_swiftkv``).

L = ``num_layers``, Lkv = ``num_key_value_layers``, g = ``key_value_group_size``.
Every token runs layers [0, Lkv); the K/V of layers [Lkv, L) come from one
projection of the residual stream entering layer Lkv, and only the rows that
need logits run those later layers. AcrossKV (g > 1): layers Lkv + i*g ..
Lkv + (i+1)*g - 1 share one K/V, so the paged cache holds Lkv + (L - Lkv)/g
layers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from arctic_jax.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class SwiftKVConfig(ModelConfig):
    """A Llama config plus the SwiftKV split (Lkv = L: exactly the Llama model)."""

    num_key_value_layers: int
    key_value_group_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        L, Lkv, g = self.num_layers, self.num_key_value_layers, self.key_value_group_size
        if not isinstance(Lkv, int) or not 1 <= Lkv <= L:
            raise ConfigError(f"num_key_value_layers must be an integer in 1..num_hidden_layers "
                              f"({L}), got {Lkv!r}")
        if not isinstance(g, int) or g < 1:
            raise ConfigError(f"key_value_group_size must be a positive integer, got {g!r}")
        if (L - Lkv) % g:
            raise ConfigError(
                f"key_value_group_size {g} does not divide the {L - Lkv} layers after "
                f"num_key_value_layers ({L} - {Lkv}); (L - Lkv) % g must be 0")

    @classmethod
    def from_llama(cls, cfg: ModelConfig, num_key_value_layers: int,
                   key_value_group_size: int = 1) -> SwiftKVConfig:
        """The SwiftKV split of a Llama config (ConfigError for an impossible split)."""
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
        return cls(**fields, num_key_value_layers=num_key_value_layers,
                   key_value_group_size=key_value_group_size)

    @property
    def num_late_layers(self) -> int:
        """L - Lkv: layers that run on the logits rows only."""
        return self.num_layers - self.num_key_value_layers

    @property
    def num_kv_groups(self) -> int:
        """(L - Lkv) / g: K/V sets the SwiftKV projection produces."""
        return self.num_late_layers // self.key_value_group_size

    @property
    def num_cache_layers(self) -> int:
        return self.num_key_value_layers + self.num_kv_groups

    def llama_config(self) -> ModelConfig:
        """The plain Llama config of all L layers (the model SwiftKV was distilled from)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    def early_layers_config(self) -> ModelConfig:
        """The plain Llama config of layers [0, Lkv)."""
        return dataclasses.replace(self.llama_config(), num_layers=self.num_key_value_layers)

    def cache_layer(self, layer: int) -> int:
        """The cache layer holding decoder layer ``layer``'s K/V."""
        Lkv = self.num_key_value_layers
        return layer if layer < Lkv else Lkv + (layer - Lkv) // self.key_value_group_size

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> SwiftKVConfig:
        """A ``llama_swiftkv`` ``config.json``: the Llama fields plus ``swiftkv``,
        ``num_key_value_layers`` (None: L) and ``key_value_group_size`` (None: 1).
        ``swiftkv: false`` serves the model as the plain Llama it was distilled from."""
        base = ModelConfig.from_hf_dict(d)
        if not d.get("swiftkv", False):
            return cls.from_llama(base, base.num_layers)
        lkv = d.get("num_key_value_layers")
        g = d.get("key_value_group_size")
        return cls.from_llama(base, base.num_layers if lkv is None else lkv, 1 if g is None else g)

    @staticmethod
    def parse_split(text: str) -> tuple[int, int]:
        """``"LKV"`` or ``"LKV:G"`` (a command-line flag) -> (Lkv, g); ValueError otherwise."""
        parts = text.split(":")
        try:
            if len(parts) > 2:
                raise ValueError
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"expected LKV or LKV:G (integers), got {text!r}") from None
        return values[0], values[1] if len(values) == 2 else 1

    def to_hf_dict(self) -> dict[str, Any]:
        """The SwiftKV fields of ``config.json``."""
        return {"swiftkv": True, "num_key_value_layers": self.num_key_value_layers,
                "key_value_group_size": self.key_value_group_size}
