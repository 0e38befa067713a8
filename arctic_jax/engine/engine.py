"""The continuous-batching engine: scheduler + model runner + detokenization.

``step()`` overlaps host and device work: it schedules and launches step n+1
before waiting for step n's tokens, so scheduling, batch building and
detokenization run while the device computes.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from arctic_jax.attention.dispatch import (PALLAS_IMPLS, cudnn_attention_supported,
                                           default_attention_impl)
from arctic_jax.config import ModelConfig
from arctic_jax.engine.detokenizer import IncrementalDetokenizer
from arctic_jax.engine.metrics import EngineMetrics
from arctic_jax.engine.model_runner import ModelRunner
from arctic_jax.engine.request import FinishReason, Request, RequestOutput
from arctic_jax.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig, StepUpdate
from arctic_jax.kv_cache import bytes_per_page
from arctic_jax.pytree import tree_nbytes
from arctic_jax.sampling import GREEDY_TEMPERATURE, SamplingParams
from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.proposer import make_proposer
from arctic_jax.speculative.stats import SpeculationStats
from sharding.mesh import ParallelConfig, resolve_parallel_config

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine limits. ``num_pages`` None sizes the cache from ``kv_cache_memory_fraction``."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
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
                   parallel_mode: str | None = None, **kwargs: Any) -> "EngineConfig":
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
        except Exception:  # noqa: BLE001 - backends without memory stats
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
    """Scheduler limits; ``max_model_len`` defaults to min(the model's, 4096).

    Without ``num_pages`` the cache takes ``kv_cache_memory_fraction`` of the least free
    device memory, after the sharded weight copies still to be placed (``weight_bytes``:
    the unsharded weights' size).
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
        if free is None:  # CPU: enough for every sequence at full length, capped at 4 GiB
            want = ec.max_num_seqs * -(-max_model_len // ec.page_size) + 1
            num_pages = max(2, min(want, (4 << 30) // page_bytes))
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
    return SchedulerConfig(max_num_seqs=ec.max_num_seqs,
                           max_num_batched_tokens=ec.max_num_batched_tokens,
                           max_model_len=max_model_len, page_size=ec.page_size,
                           num_pages=num_pages, enable_prefix_caching=ec.enable_prefix_caching)


class LLMEngine:
    """Synchronous engine core. Not thread-safe: drive it from one thread."""

    def __init__(self, spec: Any, cfg: ModelConfig, weights: Any, tokenizer: Any,
                 config: EngineConfig = EngineConfig(), *, dtype: Any = None):
        """``spec``: the model's ``ModelSpec`` (its step and head functions); ``weights``: a
        pytree of its weights class for ``cfg``."""
        self.spec = spec
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.config = config
        dtype = dtype or jax.tree_util.tree_leaves(weights)[0].dtype
        kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)
        self.sched_config = resolve_scheduler_config(cfg, config, kv_dtype, tree_nbytes(weights))
        eos = set(cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.scheduler = Scheduler(self.sched_config, eos_token_ids=eos)
        attention_impl = config.attention_impl or default_attention_impl()
        spec_cfg = config.speculative_config
        self.proposer = make_proposer(spec_cfg) if spec_cfg is not None else None
        rows_per_seq = 1 + spec_cfg.num_speculative_tokens if spec_cfg is not None else 1
        self.runner = ModelRunner(spec, cfg, weights, self.sched_config, dtype=kv_dtype,
                                  attention_impl=attention_impl,
                                  num_top_logprobs=config.max_logprobs,
                                  token_buckets=config.token_buckets,
                                  page_buckets=config.page_buckets,
                                  parallel=config.parallel,
                                  contiguous_prefill_min_tokens=resolve_contiguous_prefill(
                                      config, attention_impl, dtype, cfg.head_dim),
                                  max_logits_rows=self.sched_config.max_num_seqs * rows_per_seq)
        self.metrics = EngineMetrics()
        self.spec_stats = SpeculationStats()
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._inflight: tuple[ScheduledStep, Any, str] | None = None
        self._counter = 0
        log.info("KV cache: %d pages of %d tokens (%.2f GiB)", self.sched_config.num_pages,
                 self.sched_config.page_size,
                 self.sched_config.num_pages * bytes_per_page(cfg, config.page_size, kv_dtype) / 2**30)

    # ------------------------------------------------------------- requests
    def new_request_id(self) -> str:
        self._counter += 1
        return f"req-{self._counter}"

    def validate_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise ValueError for a prompt that can never run (length, token ids)."""
        self.scheduler.validate(len(prompt_ids))
        vocab = self.cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Queue a request; raises ValueError for one that can never run."""
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds the engine's max_logprobs "
                             f"{self.config.max_logprobs}")
        self.validate_prompt(prompt_ids)
        request_id = request_id or self.new_request_id()
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        request = Request(request_id=request_id, prompt_ids=[int(t) for t in prompt_ids],
                          params=params, seed=seed)
        self.scheduler.add(request)
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.metrics.on_arrival(request)
        return request_id

    def abort(self, request_id: str) -> bool:
        request = self.scheduler.abort(request_id)
        self._detok.pop(request_id, None)
        if request is not None and self.proposer is not None:
            self.proposer.on_finish(request)
        if request is not None:
            self.metrics.on_finish(request)
            self.metrics.on_step(self.scheduler)  # keep gauges right when no step follows
        return request is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def limits(self) -> Any:
        """The fixed request limits, an ``arctic_jax.engine.front.EngineLimits``."""
        from arctic_jax.engine.front import EngineLimits

        return EngineLimits(vocab_size=self.cfg.vocab_size,
                            max_model_len=self.sched_config.max_model_len,
                            max_logprobs=self.config.max_logprobs,
                            max_num_seqs=self.sched_config.max_num_seqs)

    # ----------------------------------------------------------------- steps
    def step(self) -> list[RequestOutput]:
        """Launch the next step, then finish the previous one; returns its outputs.

        Steps overlap: step n+1 is launched before step n's tokens are read. A request that
        may speculate needs its last token on the host to propose drafts, and a verify step
        decides the next positions, so when the step in flight samples for such a request
        it is read first (see ``_read_first``).
        """
        outputs: list[RequestOutput] = []
        if self._inflight is not None and self._read_first(self._inflight[0]):
            outputs = self._finish_step(*self._inflight)
            self._inflight = None
        self._propose()
        step = self.scheduler.schedule()
        launched = None
        if step.chunks:
            packed, variant = self.runner.dispatch(step)
            launched = (step, packed, variant)
        if self._inflight is not None:
            outputs = self._finish_step(*self._inflight)
        self._inflight = launched
        self.metrics.on_step(self.scheduler)
        return outputs

    def _may_speculate(self, request: Request) -> bool:
        """Greedy requests speculate when a proposer is configured (sampled ones do not yet)."""
        return self.proposer is not None and request.params.temperature < GREEDY_TEMPERATURE

    def _read_first(self, inflight: ScheduledStep) -> bool:
        """Whether to read the step in flight before scheduling the next: it samples for a
        request that may speculate. Steps of requests that do not speculate keep overlapping."""
        return self.proposer is not None and any(
            c.sample and self._may_speculate(c.request) for c in inflight.chunks)

    def _propose(self) -> None:
        """Ask the proposer for drafts for running requests whose next chunk is a decode with
        its last token known on the host."""
        if self.proposer is None:
            return
        ready = [r for r in self.scheduler.running
                 if self._may_speculate(r) and not r.pending and r.num_computed == r.num_tokens - 1]
        if not ready:
            return
        k = self.config.speculative_config.num_speculative_tokens
        for request, draft in zip(ready, self.proposer.propose(ready, k)):
            request.spec_tokens = list(draft)

    def _finish_step(self, step: ScheduledStep, packed: Any, variant: str) -> list[RequestOutput]:
        result = self.runner.fetch(packed, step.num_logits)
        now = time.monotonic()
        update = self.scheduler.update(step, result.tokens, result.logprobs, result.top_logprobs)
        if self.proposer is not None:
            self._record_speculation(step, update)
        outputs = []
        num_generated = 0
        for request in update.touched:
            detok = self._detok.get(request.request_id)
            if detok is None:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
                self.metrics.on_first_token(request)
            new_ids = self._detokenize(request, detok)
            num_generated += len(new_ids)
            if self.proposer is not None:
                self.proposer.on_tokens(request, new_ids)
            outputs.append(self._output(request, detok, len(new_ids)))
            if request.finished:
                self._on_finish(request)
        self.metrics.on_tokens(num_generated, step.num_tokens, variant)
        return outputs

    def _detokenize(self, request: Request, detok: IncrementalDetokenizer) -> list[int]:
        """Feed the request's new tokens to its detokenizer, one at a time when a stop string
        may land inside a run of several; a stop string ends the request there and the tokens
        after it are dropped. Returns the tokens kept."""
        new_ids = request.output_ids[detok.num_tokens:]
        if len(new_ids) <= 1 or not detok.stop:
            detok.add(new_ids)
        else:
            for i, token in enumerate(new_ids):
                detok.add([token])
                if detok.stopped:
                    if i + 1 < len(new_ids):   # without speculation the later ones never existed
                        new_ids = new_ids[:i + 1]
                        request.truncate_output(detok.num_tokens)
                        request.finish_reason = FinishReason.STOP if request.finished else None
                    break
        if detok.stopped and not request.finished:
            self.scheduler.finish(request, FinishReason.STOP)
        return new_ids

    def _record_speculation(self, step: ScheduledStep, update: StepUpdate) -> None:
        verified = {id(v.request) for v in update.verified}
        plain = sum(1 for c in step.chunks
                    if c.sample and not c.draft and id(c.request) not in verified
                    and self._may_speculate(c.request))
        for v in update.verified:
            self.spec_stats.on_verified(v.drafted, v.accepted, v.emitted)
            self.metrics.on_verified(v.drafted, v.accepted, v.emitted)
        if plain:
            self.spec_stats.on_plain_decode(plain)
            self.metrics.on_plain_decode(plain)

    def _on_finish(self, request: Request) -> None:
        self.metrics.on_finish(request)
        del self._detok[request.request_id]
        if self.proposer is not None:
            self.proposer.on_finish(request)

    def _output(self, request: Request, detok: IncrementalDetokenizer, n_new: int) -> RequestOutput:
        n = len(request.output_ids)
        top = request.top_logprobs[n - n_new:n] if request.params.logprobs else []
        if request.params.logprobs is not None:
            top = [t[:request.params.logprobs] for t in top]
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=request.output_ids[n - n_new:],
            new_text=detok.take(final=request.finished),
            new_logprobs=request.output_logprobs[n - n_new:n],
            new_top_logprobs=top,
            finished=request.finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=len(request.prompt_ids),
            num_output_tokens=n,
            num_cached_tokens=request.num_cached_prompt,
        )
