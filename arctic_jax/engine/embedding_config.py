"""Limits of an embedding engine: ``EmbeddingEngineConfig`` (what a user sets, None = default)
resolved per model and backend into ``EmbeddingLimits`` (token and sequence buckets, the
longest input, the attention implementation)."""
from __future__ import annotations

import dataclasses
import logging

import jax

from arctic_jax.attention.bidirectional import SEGMENT_ATTENTION_IMPLS, pallas_supports
from arctic_jax.config import QUANTIZATIONS, ConfigError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo ... below hi, then hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return (*out, hi)


def _powers_of_eight(hi: int) -> tuple[int, ...]:
    out, b = [], 8
    while b < hi:
        out.append(b)
        b *= 8
    return (*out, hi)


def _limit(given: int | None, buckets: tuple[int, ...] | None, default) -> int:
    """A limit as given, else the largest of its buckets, else ``default()``."""
    if given is not None:
        return given
    return buckets[-1] if buckets is not None else default()


@dataclasses.dataclass(frozen=True)
class EmbeddingEngineConfig:
    """Limits of the embedding engine; None picks a default from the model and the backend.

    - ``max_model_len``: the longest sequence in tokens (default: the model's
      ``max_position_embeddings``, or the sentence-transformers ``max_seq_length`` when that is
      smaller, as vLLM; ceiling: ``max_position_embeddings``).
    - ``max_num_batched_tokens``: the token budget of one device batch, its largest token
      bucket (default 16384 on a GPU, 2048 elsewhere, at least ``max_model_len``).
    - ``token_buckets``: the token counts compiled (default: powers of two from 256 on a GPU,
      32 elsewhere, up to the budget); the largest must equal the budget.
    - ``max_num_seqs``: most sequences in one batch (default 1024 on a GPU, 128 elsewhere).
    - ``seq_buckets``: the sequence counts compiled (default: powers of 8 up to
      ``max_num_seqs``, which is the largest).
    - ``attention_impl``: "reference" (dense segment mask; the CPU default) or "pallas" (the
      GPU default where the segment-attention kernel is installed).
    - ``dtype``: cast the weights to "float32", "bfloat16" or "float16" (None: as loaded).
    - ``quantization``: "fp8" runs every layer's matmuls on FP8 weights and activations
      (per-channel / per-token scales, ``arctic_jax.models.fp8``); None keeps ``dtype``.
    """

    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    token_buckets: tuple[int, ...] | None = None
    max_num_seqs: int | None = None
    seq_buckets: tuple[int, ...] | None = None
    attention_impl: str | None = None
    dtype: str | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("token_buckets", "seq_buckets"):
            value = getattr(self, name)
            if value is None:
                continue
            if (not isinstance(value, tuple) or not value
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
                raise ConfigError(f"{name} must be a non-empty tuple of positive integers, "
                                  f"got {value!r}")
            if list(value) != sorted(set(value)):
                raise ConfigError(f"{name} must be increasing without repeats, got {value!r}")
        if self.attention_impl is not None and self.attention_impl not in SEGMENT_ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl {self.attention_impl!r} is not one of "
                              f"{', '.join(SEGMENT_ATTENTION_IMPLS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {self.quantization!r} is not one of "
                              f"{', '.join(QUANTIZATIONS)}")

    def resolve(self, max_position_embeddings: int, backend: str | None = None,
                max_seq_length: int | None = None, head_dim: int = 64) -> EmbeddingLimits:
        """Concrete limits for a model of ``max_position_embeddings`` (and sentence-transformers
        ``max_seq_length``, if any) and attention heads of ``head_dim`` on ``backend`` (default:
        jax's); ConfigError for a combination that cannot work."""
        gpu = (backend or jax.default_backend()) == "gpu"
        max_model_len = self.max_model_len or min(max_position_embeddings,
                                                  max_seq_length or max_position_embeddings)
        if max_model_len > max_position_embeddings:
            raise ConfigError(f"max_model_len {max_model_len} exceeds the model's "
                              f"max_position_embeddings {max_position_embeddings}")

        budget = _limit(self.max_num_batched_tokens, self.token_buckets,
                        lambda: max(16384 if gpu else 2048, 1 << (max_model_len - 1).bit_length()))
        if budget < max_model_len:
            raise ConfigError(f"the token budget {budget} (max_num_batched_tokens, the largest "
                              f"token bucket) is below max_model_len {max_model_len}: a sequence "
                              f"that long could never be batched")
        token_buckets = self.token_buckets or _powers_of_two(min(256 if gpu else 32, budget), budget)
        if token_buckets[-1] != budget:
            raise ConfigError(f"the largest token bucket ({token_buckets[-1]}) must equal "
                              f"max_num_batched_tokens ({budget})")

        max_num_seqs = _limit(self.max_num_seqs, self.seq_buckets,
                              lambda: min(1024 if gpu else 128, budget))
        seq_buckets = self.seq_buckets or _powers_of_eight(max_num_seqs)
        if seq_buckets[-1] != max_num_seqs:
            raise ConfigError(f"the largest sequence bucket ({seq_buckets[-1]}) must equal "
                              f"max_num_seqs ({max_num_seqs})")

        impl = self.attention_impl
        if impl is None:   # the Pallas kernel on a GPU (measured faster than cuDNN, RESULTS.md)
            impl = "pallas" if gpu and pallas_supports(head_dim) else "reference"
            if gpu and impl == "reference":
                log.warning("head_dim %d does not suit the Pallas segment-attention kernel (a "
                            "power of 2 >= 16 is needed): using the reference attention", head_dim)
        elif impl == "pallas" and not pallas_supports(head_dim):
            raise ConfigError(f"attention_impl 'pallas' needs a head_dim that is a power of 2 >= 16; "
                              f"this model's is {head_dim}: use 'reference'")
        return EmbeddingLimits(max_model_len=max_model_len, max_num_batched_tokens=budget,
                               token_buckets=token_buckets, max_num_seqs=max_num_seqs,
                               seq_buckets=seq_buckets, attention_impl=impl)


@dataclasses.dataclass(frozen=True)
class EmbeddingLimits:
    """An ``EmbeddingEngineConfig`` resolved for one model and backend (no None left)."""

    max_model_len: int
    max_num_batched_tokens: int
    token_buckets: tuple[int, ...]
    max_num_seqs: int
    seq_buckets: tuple[int, ...]
    attention_impl: str
