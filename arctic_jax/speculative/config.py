"""``--speculative-config``: which speculative method to run and its knobs, as vLLM spells them.

Accepted keys: ``method``, ``num_speculative_tokens``, ``prompt_lookup_max``,
``prompt_lookup_min``. Only ``method: "ngram"`` runs today; the methods in
``UNSUPPORTED_METHODS`` are recognised and refused with "not supported yet".

n-gram defaults follow vLLM: neither bound given -> both 5; one given -> the
other takes its value; then 1 <= prompt_lookup_min <= prompt_lookup_max.

Turning speculation off (no flag, ``None``, an empty string) is the caller's
business: ``parse`` and ``from_dict`` always describe a method.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

SUPPORTED_METHODS = ("ngram",)
UNSUPPORTED_METHODS = (
    "suffix", "arctic", "mlp_speculator", "draft_model", "eagle", "eagle3", "medusa", "mtp",
)
ACCEPTED_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
MAX_SPECULATIVE_TOKENS = 32
DEFAULT_PROMPT_LOOKUP = 5


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"speculative config: {name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"speculative config: {name} must be {bound}, got {value}")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """A validated speculative-decoding configuration.

    ``num_speculative_tokens`` (k) is the most draft tokens per request per step.
    ``prompt_lookup_max`` / ``prompt_lookup_min`` bound the n-gram length the
    n-gram proposer matches; ``None`` is resolved to vLLM's defaults on
    construction, so a built config always holds integers.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ValueError(f"speculative config: method must be a string, got "
                             f"{type(self.method).__name__} {self.method!r}")
        if self.method in UNSUPPORTED_METHODS:
            raise ValueError(f"speculative config: method {self.method!r} is not supported yet "
                             f"(supported: {', '.join(SUPPORTED_METHODS)})")
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(
                f"speculative config: unknown method {self.method!r}; supported: "
                f"{', '.join(SUPPORTED_METHODS)}; not supported yet: {', '.join(UNSUPPORTED_METHODS)}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if hi is not None:
            _check_int("prompt_lookup_max", hi, 1)
        if lo is not None:
            _check_int("prompt_lookup_min", lo, 1)
        if lo is None and hi is None:
            lo = hi = DEFAULT_PROMPT_LOOKUP
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        if lo > hi:
            raise ValueError(f"speculative config: prompt_lookup_min={lo} must be <= "
                             f"prompt_lookup_max={hi}")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeculativeConfig:
        """Build from a mapping such as ``LLM(speculative_config={...})`` receives."""
        if not isinstance(d, Mapping):
            raise ValueError(f"speculative config must be a JSON object / dict, got {type(d).__name__}")
        unknown = [k for k in d if k not in ACCEPTED_KEYS]
        if unknown:
            raise ValueError(f"speculative config: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"accepted keys: {', '.join(ACCEPTED_KEYS)}")
        for key in ("method", "num_speculative_tokens"):
            if key not in d:
                raise ValueError(f"speculative config: {key!r} is required")
        return cls(**dict(d))

    @classmethod
    def parse(cls, text: str) -> SpeculativeConfig:
        """Build from the JSON text of ``--speculative-config '{"method": "ngram", ...}'``."""
        if not isinstance(text, str):
            raise ValueError(f"speculative config must be a JSON string, got {type(text).__name__}")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative config is not valid JSON ({e}): {text!r}") from None
        return cls.from_dict(d)

    @classmethod
    def coerce(cls, value: SpeculativeConfig | Mapping[str, Any] | str) -> SpeculativeConfig:
        """A config from what users pass: a config, a dict (``LLM(speculative_config=...)``)
        or JSON text (``--speculative-config``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls.from_dict(value)

    def as_dict(self) -> dict[str, Any]:
        """The resolved configuration, with the keys ``from_dict`` accepts."""
        return dataclasses.asdict(self)
