"""Runs scheduled steps on the device: batch building, compiled programs, sampling.

A step is two device programs, launched back to back without waiting:

- ``model_step`` reads decode tokens that are still on the device from the
  token buffer and runs the model: (cache, token buffer, inputs) -> (cache, logits);
- ``sampler_step`` samples from the logits, writes the tokens into the token
  buffer and packs everything the host needs into one int32 array, so a step
  costs one device-to-host transfer.

The model program is compiled per token/page bucket (and per parallel variant);
the sampler, whose shape is fixed, once per ``SamplingMode``. The host picks the
mode from the step's requests, so no program holds a data-dependent branch: on a
GPU such a branch makes the launching thread wait for the device, which would
undo the engine's overlap of host work with the running step.

``warmup`` compiles and runs every program ahead of time (the server and the
bench call it before they report ready), so serving reuses compiled programs
through jit's fast C++ dispatch path; a test counts compilations while serving
and requires none. The offline ``LLM`` compiles shapes lazily instead.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from arctic_jax.attention.strategy import ContiguousCausalAttention, PagedAttention
from arctic_jax.batch import Buckets, SequenceChunk, StepBatch, build_step_batch
from arctic_jax.config import ModelConfig
from arctic_jax.engine.packing import PackedLayout, pack, unpack
from arctic_jax.engine.scheduler import ScheduledStep, SchedulerConfig
from arctic_jax.kv_cache import KVCache
from arctic_jax.models.llama import StepOptions, forward
from arctic_jax.models.llama_weights import LlamaWeights
from arctic_jax.pytree import pytree_dataclass, replace
from arctic_jax.sampling import SamplingMode, SamplingTensors, sample

if TYPE_CHECKING:
    from sharding.mesh import ParallelConfig

log = logging.getLogger(__name__)


@pytree_dataclass
class ModelInputs:
    """Per-step inputs of the model program."""

    batch: StepBatch
    token_src: jax.Array       # [T] int32 token-buffer row holding the token, or -1 (host token)


@pytree_dataclass
class SamplerInputs:
    """Per-step inputs of the sampler program (R rows)."""

    sample_slot: jax.Array     # [R] int32 token-buffer row that receives the sampled token, or -1
    sampling: SamplingTensors  # [R] rows


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """Host-side inputs of one step and the sampling mode its requests need."""

    model: ModelInputs
    sampler: SamplerInputs
    mode: SamplingMode
    contiguous_prefill: bool = False   # run the model program of StepOptions.contiguous_prefill


def model_step(weights: LlamaWeights, cache: KVCache, token_buffer: jax.Array,
               packed_inputs: jax.Array, layout: PackedLayout, *, cfg: ModelConfig,
               opts: StepOptions) -> tuple[KVCache, jax.Array]:
    """The model part of a step: returns the updated cache and logits [R, V].

    ``packed_inputs`` is the int32 buffer of ``pack(ModelInputs)`` (one transfer);
    ``layout`` (static) unpacks it. Tokens marked in ``token_src`` come from the
    token buffer [max_num_seqs] (sampled by the previous step, never seen by the host).
    """
    inputs: ModelInputs = unpack(packed_inputs, layout)
    batch = inputs.batch
    from_buffer = token_buffer[jnp.maximum(inputs.token_src, 0)]
    tokens = jnp.where(inputs.token_src >= 0, from_buffer, batch.tokens)
    logits, cache = forward(weights, cache, replace(batch, tokens=tokens), cfg=cfg, opts=opts)
    return cache, logits


def sampler_step(logits: jax.Array, token_buffer: jax.Array, packed_inputs: jax.Array,
                 layout: PackedLayout, *, mode: SamplingMode,
                 num_top_logprobs: int) -> tuple[jax.Array, jax.Array]:
    """Sample logits [R, V]; returns the updated token buffer and the packed result.

    The result is int32 [R, 2 + 2 * num_top_logprobs]: token, logprob bits, top ids,
    top logprob bits.
    """
    inputs: SamplerInputs = unpack(packed_inputs, layout)
    result = sample(logits, inputs.sampling, num_top_logprobs, mode)
    slots = jnp.where(inputs.sample_slot < 0, token_buffer.shape[0], inputs.sample_slot)
    token_buffer = token_buffer.at[slots].set(result.tokens, mode="drop")
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.int32)
    columns = [result.tokens[:, None], bits(result.logprob.astype(jnp.float32))[:, None]]
    if num_top_logprobs:
        columns += [result.top_ids.astype(jnp.int32), bits(result.top_logprobs.astype(jnp.float32))]
    return token_buffer, jnp.concatenate(columns, axis=1)


@functools.lru_cache(maxsize=None)
def _jitted_model_step(cfg: ModelConfig, opts: StepOptions) -> Callable:
    """One jitted program family per model config, shared by engines of that config."""
    fn = functools.partial(model_step, cfg=cfg, opts=opts)
    return jax.jit(fn, donate_argnums=(1,), static_argnums=(4,))


@functools.lru_cache(maxsize=None)
def jitted_sampler_step(mode: SamplingMode, num_top_logprobs: int) -> Callable:
    """The jitted sampler of one mode; the token buffer is donated."""
    fn = functools.partial(sampler_step, mode=mode, num_top_logprobs=num_top_logprobs)
    return jax.jit(fn, donate_argnums=(1,), static_argnums=(3,))


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Host copy of a step's sampled tokens, one row per sampling chunk."""

    tokens: np.ndarray                # [n] int32
    logprobs: np.ndarray              # [n] float32
    top_logprobs: list[list[tuple[int, float]]] | None


class CompileCounter:
    """Counts XLA backend compilations while ``active`` (for no-recompile checks)."""

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self.active = True
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def close(self) -> None:
        """Stop counting and unregister the listener."""
        self.active = False
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if self.active and event == self._EVENT:
            self.count += 1


def _covering(sizes: tuple[int, ...], limit: int, name: str, what: str) -> tuple[int, ...]:
    """Sorted bucket sizes; the largest must cover ``limit``."""
    sizes = tuple(sorted(set(int(x) for x in sizes)))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{name} must be positive integers, got {sizes}")
    if sizes[-1] < limit:
        raise ValueError(f"the largest of {name} {sizes} is below the {what} ({limit}): "
                         f"steps that size could never run")
    return sizes


class ModelRunner:
    """Owns the weights, the KV cache and the compiled step programs.

    With a ``ParallelConfig`` the model is placed on a (sp, tp) mesh and one
    program family is compiled per step variant ("tp", "sp"); ``variant_for``
    picks one per step by its scheduled token count (shift parallelism).
    """

    def __init__(self, cfg: ModelConfig, weights: LlamaWeights, sched: SchedulerConfig, *,
                 dtype: Any, opts: StepOptions = StepOptions(), num_top_logprobs: int = 0,
                 token_buckets: tuple[int, ...] | None = None,
                 page_buckets: tuple[int, ...] | None = None,
                 parallel: "ParallelConfig | None" = None,
                 contiguous_prefill_min_tokens: int = 0):
        self.sched = sched
        self.num_top_logprobs = num_top_logprobs
        defaults = Buckets.for_limits(sched.max_num_batched_tokens, sched.max_num_seqs,
                                      sched.max_pages_per_seq, min_tokens=8)
        token_buckets = token_buckets or defaults.tokens
        self.parallel = parallel
        if parallel is not None and parallel.num_devices > 1:
            from sharding.deployment import ParallelDeployment

            dep = ParallelDeployment.create(cfg, weights, parallel)
            # Ulysses splits the token axis SP ways: every bucket is a multiple of SP.
            sp = parallel.sequence_parallel_size
            token_buckets = tuple(sorted({-(-t // sp) * sp for t in token_buckets}))
            self.cfg = dep.cfg
            self.weights = dep.weights
            self.cache = dep.allocate_cache(sched.num_pages, sched.page_size, dtype)
            jit_model = dep.jit_engine_model_step
            self.deployment = dep
        else:
            self.cfg = cfg
            self.weights = {"single": weights}
            self.cache = KVCache.allocate(cfg, sched.num_pages, sched.page_size, dtype)
            jit_model = lambda _variant, o: _jitted_model_step(cfg, o)  # noqa: E731
            self.deployment = None
        self.variants = tuple(parallel.variants) if self.deployment else ("single",)
        # Model programs by (variant, contiguous prefill); see StepOptions.contiguous_prefill.
        impl = opts.attention.impl
        self._jitted = {(v, c): jit_model(v, dataclasses.replace(
                            opts, attention=ContiguousCausalAttention(impl) if c
                            else PagedAttention(impl)))
                        for v in self.variants for c in (False, True)}
        self.contiguous_prefill_min_tokens = contiguous_prefill_min_tokens
        self.num_contiguous_steps = 0
        self._samplers = {m: jitted_sampler_step(m, num_top_logprobs) for m in SamplingMode}
        self.shift_threshold = (parallel.shift_threshold
                                if parallel is not None and isinstance(parallel.shift_threshold, int)
                                else 512)
        self.buckets = Buckets(tokens=_covering(token_buckets, sched.max_num_batched_tokens,
                                                "token_buckets", "max_num_batched_tokens"),
                               seqs=(sched.max_num_seqs,),
                               pages=_covering(page_buckets or defaults.pages,
                                               sched.max_pages_per_seq, "page_buckets",
                                               "pages per sequence (max_model_len / page_size)"))
        self.token_buffer = jnp.zeros((sched.max_num_seqs,), jnp.int32)
        self.calibration: list[tuple[int, float, float]] = []

    @property
    def needs_calibration(self) -> bool:
        """True while an "auto" shift threshold has not been measured yet."""
        return (self.parallel is not None and self.parallel.shift_threshold == "auto"
                and len(self.variants) == 2 and not self.calibration)

    def variant_for(self, num_tokens: int) -> str:
        """The step variant for a step of ``num_tokens`` scheduled tokens."""
        if len(self.variants) == 1:
            return self.variants[0]
        return "tp" if num_tokens <= self.shift_threshold else "sp"

    # ---------------------------------------------------------------- inputs
    def build_inputs(self, step: ScheduledStep) -> StepInputs:
        chunks, samplers = [], []
        for c in step.chunks:
            chunks.append(SequenceChunk(tokens=c.host_tokens, start=c.start, pages=c.request.pages,
                                        logits_at=(c.num_tokens - 1,) if c.sample else ()))
            if c.sample:
                samplers.append(c)
        batch, _ = build_step_batch(chunks, self.sched.page_size, self.buckets)
        T = batch.tokens.shape[0]
        R = batch.logits_indices.shape[0]
        token_src = np.full(T, -1, np.int32)
        offset = 0
        for c in step.chunks:
            if c.from_slot:
                token_src[offset + c.num_tokens - 1] = c.request.token_slot
            offset += c.num_tokens
        sample_slot = np.full(R, -1, np.int32)
        sample_slot[:len(samplers)] = [c.request.token_slot for c in samplers]
        params = [c.request.params for c in samplers]
        sampling = SamplingTensors.from_params(
            params, steps=[c.request.num_generated - 1 for c in samplers],
            seeds=[c.request.seed for c in samplers], num_rows=R)
        return StepInputs(model=ModelInputs(batch=batch, token_src=token_src),
                          sampler=SamplerInputs(sample_slot=sample_slot, sampling=sampling),
                          mode=SamplingMode.for_params(params),
                          contiguous_prefill=self.uses_contiguous_prefill(step, T))

    def contiguous_bucket(self, num_tokens_padded: int) -> bool:
        """Whether this token bucket has a contiguous-prefill program
        (>= ``contiguous_prefill_min_tokens``; 0: none has)."""
        least = self.contiguous_prefill_min_tokens
        return least > 0 and num_tokens_padded >= least

    def uses_contiguous_prefill(self, step: ScheduledStep, num_tokens_padded: int) -> bool:
        """True for a step that is one sequence's first chunk (no cached prefix) in a
        contiguous bucket."""
        return (self.contiguous_bucket(num_tokens_padded) and len(step.chunks) == 1
                and step.chunks[0].start == 0 and not step.chunks[0].from_slot)

    # -------------------------------------------------------------- programs
    def _run(self, variant: str, inputs: StepInputs) -> jax.Array:
        """Launch one step's two programs through jit's C++ dispatch path; returns the
        packed result without waiting for it (a warmed shape never compiles).

        Each program's host inputs travel as one packed int32 buffer.
        """
        flat, layout = pack(inputs.model)
        program = self._jitted[variant, inputs.contiguous_prefill]
        self.cache, logits = program(self.weights[variant], self.cache, self.token_buffer, flat,
                                     layout)
        self.num_contiguous_steps += inputs.contiguous_prefill
        flat, layout = pack(inputs.sampler)
        self.token_buffer, packed = self._samplers[inputs.mode](logits, self.token_buffer,
                                                                flat, layout)
        return packed

    def warmup(self, progress: bool = True) -> float:
        """Compile every bucket shape ahead of time and run each program once.

        The first run of a program pays one-time set-up costs; the dummy batch is
        all padding, so it writes no KV slot and no token-buffer row. Returns seconds.
        """
        start = time.perf_counter()
        shapes = [(v, t, p, c) for v in self.variants for t in self.buckets.tokens
                  for p in self.buckets.pages for c in (False, True)
                  if not c or self.contiguous_bucket(t)]
        iterator = shapes
        if progress:
            from tqdm import tqdm
            iterator = tqdm(shapes, desc="compiling step buckets", file=sys.stderr, unit="program")
        packed = None
        for variant, T, MP, contiguous in iterator:
            inputs = dataclasses.replace(self._dummy_inputs(T, MP), contiguous_prefill=contiguous)
            packed = self._run(variant, inputs)
        self.num_contiguous_steps = 0
        for variant in self.variants:  # every sampler mode after each variant's logits
            for mode in SamplingMode:
                inputs = self._dummy_inputs(self.buckets.tokens[0], self.buckets.pages[0])
                packed = self._run(variant, dataclasses.replace(inputs, mode=mode))
        if packed is not None:
            packed.block_until_ready()
        if self.needs_calibration:
            self.calibrate()
        return time.perf_counter() - start

    def calibrate(self, repeats: int = 5) -> int:
        """Time both variants per token bucket; set the threshold at the crossover.

        The threshold becomes the largest bucket up to which TP is at least as fast
        as SP (TP for everything if SP never wins).
        """
        MP = self.buckets.pages[-1]
        rows = []
        for T in self.buckets.tokens:
            inputs = self._dummy_inputs(T, MP)
            times = {}
            for variant in ("tp", "sp"):
                samples = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    self._run(variant, inputs).block_until_ready()
                    samples.append(time.perf_counter() - t0)
                times[variant] = float(np.median(samples))
            rows.append((T, times["tp"], times["sp"]))
        threshold = self.buckets.tokens[-1]
        for T, tp, sp in rows:
            if sp < tp:
                smaller = [b for b in self.buckets.tokens if b < T]
                threshold = smaller[-1] if smaller else 0
                break
        self.shift_threshold = threshold
        self.calibration = rows
        table = "\n".join(f"  {T:>6} tokens: tp {tp * 1e3:8.2f} ms  sp {sp * 1e3:8.2f} ms"
                          for T, tp, sp in rows)
        log.warning("shift-parallel calibration (bucket, TP, SP step times):\n%s\n"
                    "threshold set to %d tokens", table, threshold)
        return threshold

    def _dummy_inputs(self, T: int, MP: int) -> StepInputs:
        S = self.buckets.seqs[0]
        batch = StepBatch(tokens=np.zeros(T, np.int32), positions=np.zeros(T, np.int32),
                          slot_mapping=np.full(T, -1, np.int32), seq_ids=np.zeros(T, np.int32),
                          page_tables=np.zeros((S, MP), np.int32),
                          query_start=np.zeros(S + 1, np.int32), kv_lens=np.zeros(S, np.int32),
                          logits_indices=np.zeros(S, np.int32))
        sampling = SamplingTensors.from_params([], steps=[], seeds=[], num_rows=S)
        return StepInputs(model=ModelInputs(batch=batch, token_src=np.full(T, -1, np.int32)),
                          sampler=SamplerInputs(sample_slot=np.full(S, -1, np.int32),
                                                sampling=sampling),
                          mode=SamplingMode.GREEDY)

    # ------------------------------------------------------------------- run
    def dispatch(self, step: ScheduledStep) -> tuple[jax.Array, str]:
        """Launch a step asynchronously; returns the packed device result and the variant."""
        variant = self.variant_for(step.num_tokens)
        return self._run(variant, self.build_inputs(step)), variant

    def fetch(self, packed: jax.Array, num_rows: int) -> StepResult:
        """Wait for a dispatched step and copy its result to the host (one transfer)."""
        host = np.asarray(jax.device_get(packed))[:num_rows]
        tokens = host[:, 0].copy()
        logprobs = host[:, 1].view(np.float32).copy()
        top = None
        n = self.num_top_logprobs
        if n:
            ids = host[:, 2:2 + n]
            lps = host[:, 2 + n:2 + 2 * n].view(np.float32)
            top = [[(int(i), float(lp)) for i, lp in zip(ids[r], lps[r])] for r in range(num_rows)]
        return StepResult(tokens=tokens, logprobs=logprobs, top_logprobs=top)
