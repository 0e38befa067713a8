"""Runs scheduled steps on the device: owns the deployment's weights, the KV cache, the token
buffer, the penalty state and the compiled programs, and launches one step at a time.

Its parts each live in their own module: ``step_inputs`` (host inputs), ``programs`` (the
jitted model and sampler), ``calibration`` (the shift threshold), ``step_result`` (unpacking).

``warmup`` compiles and runs every program ahead of time (the server and the bench call it
before they report ready), so serving reuses compiled programs through jit's fast C++
dispatch path; a test counts compilations while serving and requires none. The offline
``LLM`` compiles shapes lazily instead.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from arctic_jax.attention.dispatch import needs_page_buckets
from arctic_jax.attention.strategy import ContiguousCausalAttention, PagedAttention
from arctic_jax.batch import Buckets
from arctic_jax.config import ModelConfig
from arctic_jax.engine import calibration
from arctic_jax.engine.background_compile import BackgroundCompiler
from arctic_jax.engine.packing import pack
from arctic_jax.engine.programs import (
    jit_draft_program,
    jit_model_step,
    jit_penalty_fill,
    jit_sampler_step,
)
from arctic_jax.engine.progress import compile_progress
from arctic_jax.engine.scheduler import ScheduledStep, SchedulerConfig
from arctic_jax.engine.step_inputs import StepInputBuilder, StepInputs
from arctic_jax.engine.step_result import StepResult, fetch_result
from arctic_jax.sampling import SamplingMode
from arctic_jax.sampling_penalties import PenaltyState, SlotFill, build_fills
from sharding.deployment import Deployment
from sharding.mesh import ParallelConfig

log = logging.getLogger(__name__)

DEFAULT_SHIFT_THRESHOLD = 512


def _covering(sizes: tuple[int, ...], limit: int, name: str, what: str) -> tuple[int, ...]:
    """Sorted bucket sizes; the largest must cover ``limit``."""
    sizes = tuple(sorted(set(int(x) for x in sizes)))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"{name} must be positive integers, got {sizes}")
    if sizes[-1] < limit:
        raise ValueError(f"the largest of {name} {sizes} is below the {what} ({limit}): "
                         f"steps that size could never run")
    return sizes


class WarmupUnit(NamedTuple):
    """One dummy step of the warm-up: the programs it reaches are compiled (and maybe run)."""

    variant: str
    tokens: int
    pages: int
    rows: int
    contiguous: bool
    mode: SamplingMode = SamplingMode.GREEDY
    verify: bool = False
    draft: bool = False
    penalties: bool = False


def _shape_of(x: Any) -> Any:
    return None if x is None else jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), x)


def _zeros_of(shape: Any) -> Any:
    """Zero arrays of ``_shape_of``'s shapes, placed with their shardings."""
    return None if shape is None else jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), shape)


class ModelRunner:
    """Owns the placed weights, the KV cache and the compiled step programs.

    The model is placed by a ``Deployment`` (one device, or a (sp, tp) mesh with one
    program family per step variant "tp"/"sp"); ``variant_for`` picks one per step by its
    scheduled token count (shift parallelism).
    """

    def __init__(self, spec: Any, cfg: ModelConfig, weights: Any, sched: SchedulerConfig, *,
                 dtype: Any, attention_impl: str = "reference", num_top_logprobs: int = 0,
                 token_buckets: tuple[int, ...] | None = None,
                 page_buckets: tuple[int, ...] | None = None,
                 parallel: ParallelConfig | None = None,
                 contiguous_prefill_min_tokens: int = 0, max_logits_rows: int | None = None,
                 speculative: bool = False, tree_attention: bool = False,
                 draft_model: tuple[Any, Any] | None = None, draft_tokens: int = 0,
                 max_rows_per_seq: int = 1):
        """``draft_model``: (``DraftModelConfig``, weights) of a draft model that proposes
        ``draft_tokens`` tokens after every sampled chunk (its programs follow the sampler's);
        ``max_rows_per_seq``: the most logits rows one chunk asks for."""
        self.sched = sched
        self.num_top_logprobs = num_top_logprobs
        self.parallel = parallel
        defaults = Buckets.for_limits(sched.max_num_batched_tokens, sched.max_num_seqs,
                                      sched.max_pages_per_seq, min_tokens=8)
        token_buckets = token_buckets or defaults.tokens
        self.deployment = Deployment.create(cfg, weights, parallel)
        dep = self.deployment
        self.cfg = dep.cfg
        self.weights = dep.weights
        self.variants = dep.variants
        self.cache = dep.allocate_cache(sched.num_pages, sched.page_size, dtype)
        if parallel is not None:
            # Ulysses splits the token axis SP ways: every bucket is a multiple of SP.
            sp = parallel.sequence_parallel_size
            token_buckets = tuple(sorted({-(-t // sp) * sp for t in token_buckets}))
        self.routes = {False: PagedAttention(attention_impl),
                       True: ContiguousCausalAttention(attention_impl)}
        keep_hidden = draft_model is not None
        self._programs = {(v, c): jit_model_step(spec, dep, v, route, keep_hidden)
                          for v in self.variants for c, route in self.routes.items()}
        self.draft_cfg = self.draft_weights = self.draft_q = None
        self.draft_tokens = draft_tokens if draft_model is not None else 0
        self._draft_programs = {}
        if draft_model is not None:
            self.draft_cfg, weights = draft_model
            self.draft_weights = jax.device_put(weights, dep.replicated)
            self.draft_q = jax.device_put(
                jnp.zeros((sched.max_num_seqs * draft_tokens, self.draft_cfg.vocab_size),
                          jnp.float32), dep.replicated)
            result_cols = 2 + 2 * num_top_logprobs
            self._draft_programs = {
                (m, v): jit_draft_program(self.draft_cfg, draft_tokens, m, max_rows_per_seq,
                                          result_cols if v else None)
                for m in SamplingMode for v in (False, True)}
        # Sampler programs by (mode, verify, penalties); the verify variants only with speculation
        # on, the penalty variants (and their per-slot state) only with it off.
        self.speculative = speculative
        variants = ((False, False), (True, False)) if speculative else ((False, False), (False, True))
        self._samplers = {(m, v, p): jit_sampler_step(m, num_top_logprobs, v, p)
                          for m in SamplingMode for v, p in variants}
        self.penalty_state = None if speculative else jax.device_put(
            PenaltyState.zeros(sched.max_num_seqs, self.cfg.vocab_size), dep.replicated)
        self._penalty_fill = jit_penalty_fill()
        self._penalty_rows: dict[int, tuple[Any, int]] = {}   # slot -> (request, preemptions) loaded
        self.num_contiguous_steps = 0
        self.shift_threshold = (parallel.shift_threshold
                                if parallel is not None and isinstance(parallel.shift_threshold, int)
                                else DEFAULT_SHIFT_THRESHOLD)
        buckets = Buckets(tokens=_covering(token_buckets, sched.max_num_batched_tokens,
                                           "token_buckets", "max_num_batched_tokens"),
                          seqs=(sched.max_num_seqs,),
                          pages=_covering(page_buckets or (defaults.pages if needs_page_buckets(
                              attention_impl) else (sched.max_pages_per_seq,)), sched.max_pages_per_seq,
                                          "page_buckets",
                                          "pages per sequence (max_model_len / page_size)"),
                          max_logits_rows=max_logits_rows)
        self.inputs = StepInputBuilder(buckets, sched.page_size, contiguous_prefill_min_tokens,
                                       tree=tree_attention, draft_k=self.draft_tokens)
        self.token_buffer = jax.device_put(jnp.zeros((sched.max_num_seqs,), jnp.int32),
                                           dep.replicated)
        self.calibration: list[calibration.Row] = []
        self.background: BackgroundCompiler | None = None
        # the buffers each step donates, as shapes and shardings (what compile_unit lowers with)
        self._donated = (_shape_of(self.cache), _shape_of(self.token_buffer), _shape_of(self.draft_q),
                         _shape_of(self.penalty_state))

    @property
    def buckets(self) -> Buckets:
        return self.inputs.buckets

    @property
    def contiguous_prefill_min_tokens(self) -> int:
        return self.inputs.contiguous_min_tokens

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

    # -------------------------------------------------------------------- run
    def _run(self, variant: str, inputs: StepInputs) -> jax.Array:
        """Launch one step's two programs through jit's C++ dispatch path; returns the
        packed result without waiting for it (a warmed shape never compiles).

        Each program's host inputs travel as one packed int32 buffer.
        """
        for fill in inputs.fills:
            flat, layout = pack(fill)
            self.penalty_state = self._penalty_fill(self.penalty_state, flat, layout)
        flat, layout = pack(inputs.model)
        program = self._programs[variant, inputs.contiguous]
        out = program(self.weights[variant], self.cache, self.token_buffer, flat, layout)
        self.cache, logits = out[:2]
        self.num_contiguous_steps += inputs.contiguous
        flat, layout = pack(inputs.sampler)
        # the same arguments as compile_unit's (an omitted default would be another signature)
        sampled = self._samplers[inputs.mode, inputs.verify, inputs.penalties](
            logits, self.token_buffer, self.draft_q, flat, layout,
            self.penalty_state if inputs.penalties else None)
        self.token_buffer, packed = sampled[:2]
        if inputs.penalties:
            self.penalty_state = sampled[2]
        if inputs.draft is not None:
            flat, layout = pack(inputs.draft)
            self.draft_q, packed = self._draft_programs[inputs.draft_mode, inputs.verify](
                self.draft_weights, out[2], packed, self.draft_q, flat, layout)
        return packed

    def _carried(self) -> tuple:
        """The buffers each step donates and the next one receives (``None`` where unused)."""
        return self.cache, self.token_buffer, self.draft_q, self.penalty_state

    def device_state_lost(self) -> bool:
        """Whether a carried buffer is gone: deleted (donated to a call that then failed) or
        holding a failed computation's error. Waits for the launched steps (failure path only)."""
        leaves = jax.tree.leaves(self._carried())
        if any(a.is_deleted() for a in leaves):
            return True
        try:
            jax.block_until_ready(leaves)
        except Exception:
            return True
        return False

    def reset_device_state(self) -> None:
        """Re-allocate the carried buffers as zeros (the KV cache's content, the token buffer's
        pending tokens and the penalty rows are lost: the engine preempts every running
        request first, so each recomputes from its host tokens and reloads its penalty row)."""
        self.cache = self.token_buffer = self.draft_q = self.penalty_state = None   # free first
        self.cache, self.token_buffer, self.draft_q, self.penalty_state = (
            _zeros_of(s) for s in self._donated)
        self._penalty_rows.clear()

    def dispatch(self, step: ScheduledStep, draft: bool = False) -> tuple[jax.Array, str]:
        """Launch a step asynchronously (``draft``: and the draft program after it); returns the
        packed device result and the variant."""
        variant = self.variant_for(step.num_tokens)
        inputs = self.inputs.build(step, draft and self.draft_cfg is not None)
        fills = self._penalty_fills(step)
        if fills:
            inputs = dataclasses.replace(inputs, fills=fills)
        return self._run(variant, inputs), variant

    def _penalty_fills(self, step: ScheduledStep) -> tuple[SlotFill, ...]:
        """Fills loading the penalty rows of the step's requests with penalties or a logit bias
        that took their slot since their row was last loaded (admitted, or re-admitted after a
        preemption: then every output token is known on the host)."""
        histories = []
        for c in step.chunks:
            request = c.request
            if not request.params.adjusts_logits():
                continue
            loaded = self._penalty_rows.get(request.token_slot)
            if loaded is not None and loaded[0] is request and loaded[1] == request.num_preemptions:
                continue
            self._penalty_rows[request.token_slot] = (request, request.num_preemptions)
            histories.append((request.token_slot, request.prompt_ids, request.output_ids,
                              request.params.logit_bias))
        return tuple(build_fills(histories, self.sched.max_num_seqs)) if histories else ()

    def fetch(self, packed: jax.Array, num_rows: int, verify: bool = False,
              drafted: bool = False) -> StepResult:
        """Wait for a dispatched step and copy its first ``num_rows`` result rows to the host
        (``verify``: the step verified drafts, its result carries the accepted flags;
        ``drafted``: the draft program ran, the result carries its proposals)."""
        return fetch_result(packed, num_rows, self.num_top_logprobs, verify,
                            self.draft_tokens if drafted else 0)

    # ----------------------------------------------------------------- warm-up
    def warmup_units(self) -> list[WarmupUnit]:
        """Every program a run may launch, as the dummy steps that reach them: each model shape
        (with the greedy sampler), then each sampler mode (and draft program) per logits-row
        count after the smallest token bucket that has it."""
        units = [WarmupUnit(v, *shape) for v in self.variants for shape in self.inputs.shapes()]
        rows = sorted({R for T in self.buckets.tokens for R in self.buckets.rows_for(T)})
        for variant in self.variants:
            for R in rows:
                T = next(t for t in self.buckets.tokens if R in self.buckets.rows_for(t))
                for mode, verify, penalties in self._samplers:   # each draft program after its sampler
                    units.append(WarmupUnit(variant, T, self.buckets.pages[0], R, False, mode,
                                            verify, self.draft_cfg is not None, penalties))
        return units

    def _dummy(self, unit: WarmupUnit) -> StepInputs:
        return self.inputs.dummy(unit.tokens, unit.pages, unit.rows, mode=unit.mode,
                                 contiguous=unit.contiguous, verify=unit.verify,
                                 draft_mode=unit.mode if unit.draft else None,
                                 penalties=unit.penalties)

    def compile_unit(self, unit: WarmupUnit) -> None:
        """Compile, without running, the programs ``_run`` launches for ``unit``.

        Safe beside running steps: the donated buffers enter as their shapes and shardings
        (``_donated``), so the programs equal those a step's call compiles, and that call
        then finds them compiled.
        """
        inputs = self._dummy(unit)
        cache, token_buffer, draft_q, penalty_state = self._donated
        for fill in inputs.fills:
            flat, layout = pack(fill)
            self._penalty_fill.lower(penalty_state, flat, layout).compile()
        flat, layout = pack(inputs.model)
        model = self._programs[unit.variant, inputs.contiguous].lower(
            self.weights[unit.variant], cache, token_buffer, flat, layout)
        model.compile()
        outs = model.out_info
        flat, layout = pack(inputs.sampler)
        sampler = self._samplers[inputs.mode, inputs.verify, inputs.penalties].lower(
            outs[1], token_buffer, draft_q, flat, layout,
            penalty_state if inputs.penalties else None)
        sampler.compile()
        if inputs.draft is not None:
            flat, layout = pack(inputs.draft)
            self._draft_programs[inputs.draft_mode, inputs.verify].lower(
                self.draft_weights, outs[2], self._on_mesh(sampler.out_info[1]), draft_q, flat,
                layout).compile()

    def _on_mesh(self, out: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        """A program output as the next program receives it: the real array lives on the
        deployment's mesh (replicated), where ``out_info`` leaves the sharding open."""
        return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=self.deployment.replicated)

    def warmup(self, progress: bool = True, run: bool | None = None,
               upto_tokens: int | None = None) -> float:
        """Compile the programs ahead of time; returns seconds.

        ``run`` (default: on an accelerator) also runs each program once on a dummy step,
        paying its one-time set-up costs before serving; the dummy batches are all padding,
        so they write no KV slot and no token-buffer row. On a CPU there is no launch
        latency to hide and a dummy step costs as much compute as a real one, so the
        programs are only compiled. ``upto_tokens``: only the programs of token buckets up to
        that many tokens (the rest: ``compile_in_background``).
        """
        start = time.perf_counter()
        run = jax.default_backend() != "cpu" if run is None else run
        units = [u for u in self.warmup_units() if upto_tokens is None or u.tokens <= upto_tokens]
        packed = None
        for unit in compile_progress(units, "compiling step programs", progress):
            if run:
                packed = self._run(unit.variant, self._dummy(unit))
            else:
                self.compile_unit(unit)
        self.num_contiguous_steps = 0
        if packed is not None:
            packed.block_until_ready()
        if self.needs_calibration:
            self.calibrate()
        return time.perf_counter() - start

    def compile_in_background(self, after_tokens: int,
                              on_done: Any = None) -> BackgroundCompiler:
        """Compile the programs of the token buckets above ``after_tokens`` in a thread (see
        ``arctic_jax.engine.background_compile``); ``token_cap`` follows its progress."""
        units = [u for u in self.warmup_units() if u.tokens > after_tokens]
        self.background = BackgroundCompiler(units, self.compile_unit, lambda u: u.tokens,
                                             after_tokens, on_done).start()
        return self.background

    def token_cap(self) -> int | None:
        """The most tokens a step may hold while programs compile in the background (None:
        no limit)."""
        bg = self.background
        return None if bg is None or bg.done else bg.ready_tokens

    def calibrate(self, repeats: int = 5) -> int:
        """Time both variants per token bucket; set the threshold at the crossover."""
        MP = self.buckets.pages[-1]
        tokens = self.buckets.tokens
        rows = calibration.time_variants(
            lambda variant, T: self._run(variant, self.inputs.dummy(T, MP)), tokens, repeats)
        self.shift_threshold = calibration.crossover_threshold(rows, tokens)
        self.calibration = rows
        calibration.log_calibration(rows, self.shift_threshold)
        return self.shift_threshold
