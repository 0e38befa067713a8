"""``--speculative-config``: which speculative method to run and its knobs, as vLLM and Arctic
Inference spell them.

Keys for every method: ``method``, ``num_speculative_tokens`` (k), ``disable_by_batch_size``
(soft: with more running requests than this, only the first N draft),
``hard_disable_by_batch_size`` (with more running requests than this, none drafts) and
``adaptive_disable_batch_size`` (default 32; 0: off): with more running requests than this,
speculation stays on only while it measurably emits more tokens per second than decoding
without it (``governor``).

- ``method: "ngram"`` (vLLM's prompt lookup): k is required; ``prompt_lookup_max`` /
  ``prompt_lookup_min`` follow vLLM: neither given -> both 5; one given -> the other takes its
  value; then 1 <= min <= max.
- ``method: "suffix"`` (Arctic's suffix decoding; upstream vLLM's defaults):
  ``suffix_cache_max_depth`` 24, ``suffix_cache_max_requests`` 10000 (0: no global tree, -1:
  unlimited), ``suffix_max_spec_factor`` 1.0, ``suffix_max_spec_offset`` 0.0,
  ``suffix_min_token_prob`` 0.1, ``disable_by_batch_size`` 64; k defaults to the depth (at most
  ``MAX_SPECULATIVE_TOKENS``). ``suffix_use_tree_spec`` (false; Arctic's ``use_tree_spec``)
  drafts a token tree of up to k tokens, verified in one step through a tree attention mask.

- ``method: "arctic"`` (Arctic's draft-model speculator; ``"mlp_speculator"`` is the same without
  suffix decoding): ``model`` (required) is the draft checkpoint directory (Arctic / IBM MLP or
  LSTM speculator); k defaults to the draft's ``n_predict`` (resolved when the checkpoint is
  read; at most ``n_predict``). ``enable_suffix_decoding`` (false) adds suffix drafts: a request
  takes the suffix draft when its score is at least ``n_predict``, otherwise the model's; the
  suffix keys above then apply, with ``suffix_speculative_tokens`` (the suffix method's k
  default) bounding suffix drafts. ``disable_by_batch_size`` defaults to 64.

A key of another method is refused, naming the method it belongs to. The methods in
``UNSUPPORTED_METHODS`` are recognised and refused with "not supported yet". Turning
speculation off (no flag, ``None``) is the caller's business.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

SUPPORTED_METHODS = ("ngram", "suffix", "arctic", "mlp_speculator")
UNSUPPORTED_METHODS = ("draft_model", "eagle", "eagle3", "medusa", "mtp")
DRAFT_MODEL_METHODS = ("arctic", "mlp_speculator")
COMMON_KEYS = ("method", "num_speculative_tokens", "disable_by_batch_size",
               "hard_disable_by_batch_size", "adaptive_disable_batch_size")
METHOD_KEYS = {
    "ngram": ("prompt_lookup_max", "prompt_lookup_min"),
    "suffix": ("suffix_cache_max_depth", "suffix_cache_max_requests", "suffix_max_spec_factor",
               "suffix_max_spec_offset", "suffix_min_token_prob", "suffix_use_tree_spec"),
    "arctic": ("model", "enable_suffix_decoding", "suffix_speculative_tokens"),
}
# keys of other methods that a method also accepts
SHARED_KEYS = {"arctic": METHOD_KEYS["suffix"][:-1], "mlp_speculator": ("model",)}
ACCEPTED_KEYS = COMMON_KEYS + tuple(k for keys in METHOD_KEYS.values() for k in keys)
DRAFT_MODEL_DISABLE_BY_BATCH_SIZE = 64
ADAPTIVE_DISABLE_BATCH_SIZE = 32
MAX_SPECULATIVE_TOKENS = 32
DEFAULT_PROMPT_LOOKUP = 5
SUFFIX_DEFAULTS = {"suffix_cache_max_depth": 24, "suffix_cache_max_requests": 10000,
                   "suffix_max_spec_factor": 1.0, "suffix_max_spec_offset": 0.0,
                   "suffix_min_token_prob": 0.1, "suffix_use_tree_spec": False,
                   "disable_by_batch_size": 64}


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"speculative config: {name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"speculative config: {name} must be {bound}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"speculative config: {name} must be a number, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"speculative config: {name} must be {bound}, got {value}")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """A validated speculative-decoding configuration; ``None`` fields of the chosen method are
    resolved to their defaults on construction, other methods' fields stay ``None``."""

    method: str
    num_speculative_tokens: int | None = None
    disable_by_batch_size: int | None = None
    hard_disable_by_batch_size: int | None = None
    adaptive_disable_batch_size: int | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    suffix_cache_max_depth: int | None = None
    suffix_cache_max_requests: int | None = None
    suffix_max_spec_factor: float | None = None
    suffix_max_spec_offset: float | None = None
    suffix_min_token_prob: float | None = None
    suffix_use_tree_spec: bool | None = None
    model: str | None = None
    enable_suffix_decoding: bool | None = None
    suffix_speculative_tokens: int | None = None

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
        own = set(METHOD_KEYS.get(self.method, ())) | set(SHARED_KEYS.get(self.method, ()))
        for method, keys in METHOD_KEYS.items():
            given = [k for k in keys if getattr(self, k) is not None and k not in own]
            if method != self.method and given:
                raise ValueError(f"speculative config: {', '.join(given)} applies to method "
                                 f"{method!r}, not {self.method!r}")
        if self.method == "ngram":
            self._resolve_ngram()
        elif self.method == "suffix":
            self._resolve_suffix()
        else:
            self._resolve_draft_model()
        if self.num_speculative_tokens is not None or self.method not in DRAFT_MODEL_METHODS:
            _check_int("num_speculative_tokens", self.num_speculative_tokens, 1,
                       MAX_SPECULATIVE_TOKENS)
        for name in ("disable_by_batch_size", "hard_disable_by_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.adaptive_disable_batch_size is None:
            self._set("adaptive_disable_batch_size", ADAPTIVE_DISABLE_BATCH_SIZE)
        _check_int("adaptive_disable_batch_size", self.adaptive_disable_batch_size, 0)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _resolve_ngram(self) -> None:
        if self.num_speculative_tokens is None:
            raise ValueError("speculative config: 'num_speculative_tokens' is required for method "
                             "'ngram'")
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
        self._set("prompt_lookup_min", lo)
        self._set("prompt_lookup_max", hi)

    def _resolve_suffix(self) -> None:
        for name, default in SUFFIX_DEFAULTS.items():
            if getattr(self, name) is None:
                self._set(name, default)
        self._check_suffix_values()
        if not isinstance(self.suffix_use_tree_spec, bool):
            raise ValueError(f"speculative config: suffix_use_tree_spec must be true or false, got "
                             f"{self.suffix_use_tree_spec!r}")
        if self.num_speculative_tokens is None:
            self._set("num_speculative_tokens", min(self.suffix_cache_max_depth,
                                                    MAX_SPECULATIVE_TOKENS))

    def _check_suffix_values(self) -> None:
        _check_int("suffix_cache_max_depth", self.suffix_cache_max_depth, 1)
        _check_int("suffix_cache_max_requests", self.suffix_cache_max_requests, -1)
        _check_float("suffix_max_spec_factor", self.suffix_max_spec_factor, 0.0)
        _check_float("suffix_max_spec_offset", self.suffix_max_spec_offset, -float(2**31))
        _check_float("suffix_min_token_prob", self.suffix_min_token_prob, 0.0, 1.0)

    def _resolve_draft_model(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"speculative config: method {self.method!r} needs 'model', the draft "
                             f"checkpoint directory, got {self.model!r}")
        if self.enable_suffix_decoding is None:
            self._set("enable_suffix_decoding", False)
        if not isinstance(self.enable_suffix_decoding, bool):
            raise ValueError("speculative config: enable_suffix_decoding must be true or false, "
                             f"got {self.enable_suffix_decoding!r}")
        suffix_keys = METHOD_KEYS["suffix"][:-1] + ("suffix_speculative_tokens",)
        given = [k for k in suffix_keys if getattr(self, k) is not None]
        if given and not self.enable_suffix_decoding:
            raise ValueError(f"speculative config: {', '.join(given)} needs "
                             "\"enable_suffix_decoding\": true")
        if self.disable_by_batch_size is None:
            self._set("disable_by_batch_size", DRAFT_MODEL_DISABLE_BY_BATCH_SIZE)
        if not self.enable_suffix_decoding:
            return
        for name, default in SUFFIX_DEFAULTS.items():
            if name != "suffix_use_tree_spec" and getattr(self, name) is None:
                self._set(name, default)
        self._check_suffix_values()
        if self.suffix_speculative_tokens is None:
            self._set("suffix_speculative_tokens", min(self.suffix_cache_max_depth,
                                                       MAX_SPECULATIVE_TOKENS))
        _check_int("suffix_speculative_tokens", self.suffix_speculative_tokens, 1,
                   MAX_SPECULATIVE_TOKENS)

    @property
    def uses_draft_model(self) -> bool:
        return self.method in DRAFT_MODEL_METHODS

    @property
    def uses_suffix(self) -> bool:
        return self.method == "suffix" or bool(self.enable_suffix_decoding)

    def with_draft_tokens(self, n_predict: int) -> SpeculativeConfig:
        """A draft-model config with k resolved against the checkpoint's ``n_predict``."""
        k = self.num_speculative_tokens
        if k is None:
            k = n_predict
        if k > n_predict:
            raise ValueError(f"speculative config: num_speculative_tokens={k} exceeds the draft "
                             f"model's n_predict={n_predict}")
        return dataclasses.replace(self, num_speculative_tokens=k)

    @property
    def max_draft_tokens(self) -> int:
        """The most drafts one request carries in a step."""
        return max(self.num_speculative_tokens or 0, self.suffix_speculative_tokens or 0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeculativeConfig:
        """Build from a mapping such as ``LLM(speculative_config={...})`` receives."""
        if not isinstance(d, Mapping):
            raise ValueError(f"speculative config must be a JSON object / dict, got {type(d).__name__}")
        unknown = [k for k in d if k not in ACCEPTED_KEYS]
        if unknown:
            raise ValueError(f"speculative config: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"accepted keys: {', '.join(ACCEPTED_KEYS)}")
        if "method" not in d:
            raise ValueError("speculative config: 'method' is required")
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
        """The resolved configuration: every key that is set (``from_dict`` accepts it back)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
