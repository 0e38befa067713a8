"""Engine configuration and sizing: ``EngineConfig`` (user-facing limits), the KV cache dtype,
the contiguous-prefill threshold, and the scheduler limits with the KV cache sized from free
device memory."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from arctic_jax.attention.dispatch import PALLAS_IMPLS, cudnn_attention_supported
from arctic_jax.config import ModelConfig
from arctic_jax.engine.scheduler import SchedulerConfig
from arctic_jax.kv_cache import bytes_per_page
from arctic_jax.speculative.config import SpeculativeConfig
from sharding.mesh import ParallelConfig, resolve_parallel_config


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits. ``num_pages`` None sizes the cache from ``kv_cache_memory_fraction``."""

    max_num_seqs: int = 32
    # None: DEFAULT_MAX_NUM_BATCHED_TOKENS, on a CPU CPU_MAX_NUM_BATCHED_TOKENS (at least max_num_seqs)
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_memory_fraction: float = 0.5
    enable_prefix_caching: bool = True
    attention_impl: str | None = None
    max_logprobs: int = 5
    token_buckets: tuple[int, ...] | None = None
    page_buckets: tuple[int, ...] | None = None
    parallel: ParallelConfig | None = None
    # Prompt-only steps of >= this many padded tokens use contiguous (cuDNN) attention;
    # 0: never; None: DEFAULT_CONTIGUOUS_PREFILL_MIN_TOKENS with Pallas attention on a GPU.
    contiguous_prefill_min_tokens: int | None = None
    kv_cache_dtype: str = "auto"     # "auto": the model's dtype; "fp8": float8_e4m3fn (half the bytes)
    speculative_config: SpeculativeConfig | None = None   # None: no speculative decoding

    def __post_init__(self) -> None:
        resolve_kv_cache_dtype(self.kv_cache_dtype, jnp.float32)  # fails early on a bad name
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got "
                             f"{self.kv_cache_memory_fraction}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {self.num_pages}")
        if self.contiguous_prefill_min_tokens is not None and self.contiguous_prefill_min_tokens < 0:
            raise ValueError(f"contiguous_prefill_min_tokens must be >= 0, got "
                             f"{self.contiguous_prefill_min_tokens}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20], got {self.max_logprobs}")

    @classmethod
    def from_flags(cls, *, tensor_parallel_size: int = 1, sequence_parallel_size: int = 1,
                   enable_shift_parallel: bool = False, shift_parallel_threshold: int | str = 512,
                   parallel_mode: str | None = None, **kwargs: Any) -> EngineConfig:
        """An EngineConfig from user-facing keyword arguments, parallel flags included."""
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        if kwargs.get("speculative_config") is not None:
            kwargs["speculative_config"] = SpeculativeConfig.coerce(kwargs["speculative_config"])
        parallel = resolve_parallel_config(tensor_parallel_size, sequence_parallel_size,
                                           enable_shift_parallel, shift_parallel_threshold,
                                           parallel_mode)
        return cls(parallel=parallel, **kwargs)


def _device_free_bytes(num_devices: int = 1) -> int | None:
    """The least free memory over the first ``num_devices`` devices (None: not reported)."""
    free = []
    for device in jax.devices()[:num_devices]:
        try:
            stats = device.memory_stats()
        except Exception:  # backends without memory stats
            return None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    return min(free)


def _kv_bytes_per_page_per_device(cfg: ModelConfig, ec: EngineConfig, dtype: Any) -> int:
    """Device bytes of one page on one device: the placed KV heads split over P devices."""
    if ec.parallel is None or ec.parallel.num_devices == 1:
        return bytes_per_page(cfg, ec.page_size, dtype)
    from sharding.placement import placed_config, plan_heads

    P = ec.parallel.num_devices
    placed = placed_config(cfg, plan_heads(cfg, P))
    return bytes_per_page(placed, ec.page_size, dtype) // P


def _weight_copies_per_device(ec: EngineConfig, weight_bytes: int) -> int:
    """Device bytes the sharded weight copies will take (one copy per step variant)."""
    if ec.parallel is None or ec.parallel.num_devices == 1:
        return 0  # the weights are already on the device, so already out of the free memory
    split = {"tp": ec.parallel.num_devices, "sp": ec.parallel.tensor_parallel_size}
    return sum(weight_bytes // split[v] for v in ec.parallel.variants)


DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
# A CPU step's time grows with its tokens and their context, and a running stream waits one step
# per token. SmolLM2-135M on 2 cores (benchmarks/cpu_prefill.py, RESULTS.md, issue 16), longest
# wait of a stream next to a 2,000 / 4,000-token prefill: 128 -> 0.60 / 0.60 s, 256 -> 0.79 /
# 1.20 s, 512 -> 1.36 s; prefill of 2,000 tokens: 398 / 440 / 481 tok/s.
CPU_MAX_NUM_BATCHED_TOKENS = 128


def default_max_num_batched_tokens(max_num_seqs: int) -> int:
    """The step token budget when none is given: the backend's default, at least
    ``max_num_seqs`` (every running sequence must be able to decode in one step)."""
    cpu = jax.default_backend() == "cpu"
    return max(max_num_seqs, CPU_MAX_NUM_BATCHED_TOKENS if cpu else DEFAULT_MAX_NUM_BATCHED_TOKENS)


# A CPU has no device memory to measure: without num_pages the KV cache holds every sequence
# at full length if that fits in this many bytes, else as many pages as fit (at least one
# full-length sequence); the scheduler preempts when they run out. 512 MiB is ~11k tokens of
# SmolLM2-135M in float32.
CPU_KV_CACHE_BYTES = 512 << 20
KV_CACHE_DTYPES = {"fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                   "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def resolve_kv_cache_dtype(name: str, model_dtype: Any) -> Any:
    """The cache dtype for ``--kv-cache-dtype``: "auto" is the model's dtype."""
    if name == "auto":
        return jnp.dtype(model_dtype)
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {name!r} is not one of auto, {', '.join(KV_CACHE_DTYPES)}")
    return jnp.dtype(KV_CACHE_DTYPES[name])


DEFAULT_CONTIGUOUS_PREFILL_MIN_TOKENS = 1024


def resolve_contiguous_prefill(ec: EngineConfig, attention_impl: str, dtype: Any,
                               head_dim: int) -> int:
    """The token bucket from which a prompt's first chunk runs contiguous attention (0: off).

    By default on only where it is faster: where cuDNN takes the inputs (a GPU, 16-bit,
    head_dim a multiple of 8 up to 128), next to the Pallas kernels.
    """
    if ec.contiguous_prefill_min_tokens is not None:
        return ec.contiguous_prefill_min_tokens
    faster = attention_impl in PALLAS_IMPLS and cudnn_attention_supported(dtype, head_dim)
    return DEFAULT_CONTIGUOUS_PREFILL_MIN_TOKENS if faster else 0


def resolve_scheduler_config(cfg: ModelConfig, ec: EngineConfig, dtype: Any,
                             weight_bytes: int = 0) -> SchedulerConfig:
    """Scheduler limits; ``max_model_len`` defaults to min(the model's, 4096) and
    ``max_num_batched_tokens`` to ``default_max_num_batched_tokens``.

    Without ``num_pages`` the cache takes ``kv_cache_memory_fraction`` of the least free
    device memory, after the sharded weight copies still to be placed (``weight_bytes``:
    the unsharded weights' size); on a CPU it is bounded by ``CPU_KV_CACHE_BYTES``.
    """
    max_model_len = ec.max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
    if ec.max_model_len and ec.max_model_len > cfg.max_position_embeddings:
        raise ValueError(f"max_model_len {ec.max_model_len} exceeds the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}")
    num_pages = ec.num_pages
    if num_pages is None:
        page_bytes = _kv_bytes_per_page_per_device(cfg, ec, dtype)
        P = ec.parallel.num_devices if ec.parallel is not None else 1
        free = _device_free_bytes(P)
        if free is None:  # CPU: every sequence at full length, within CPU_KV_CACHE_BYTES
            want = ec.max_num_seqs * -(-max_model_len // ec.page_size) + 1
            fits = CPU_KV_CACHE_BYTES // page_bytes
            num_pages = max(2, min(want, max(fits, -(-max_model_len // ec.page_size) + 1)))
        else:
            free -= _weight_copies_per_device(ec, weight_bytes)
            num_pages = int(max(free, 0) * ec.kv_cache_memory_fraction) // page_bytes
        if num_pages < 2:
            raise ValueError("not enough device memory for a KV cache; lower max_model_len or "
                             "raise kv_cache_memory_fraction")
    if num_pages < -(-max_model_len // ec.page_size):
        raise ValueError(
            f"a KV cache of {num_pages} pages x {ec.page_size} tokens cannot hold one sequence of "
            f"max_model_len={max_model_len} tokens; lower max_model_len or give the cache more pages")
    budget = ec.max_num_batched_tokens
    if budget is None:
        budget = default_max_num_batched_tokens(ec.max_num_seqs)
    return SchedulerConfig(max_num_seqs=ec.max_num_seqs,
                           max_num_batched_tokens=budget,
                           max_model_len=max_model_len, page_size=ec.page_size,
                           num_pages=num_pages, enable_prefix_caching=ec.enable_prefix_caching)
