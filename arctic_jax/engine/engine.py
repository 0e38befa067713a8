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
from collections.abc import Sequence
from typing import Any

import jax

from arctic_jax.attention.dispatch import default_attention_impl
from arctic_jax.config import ConfigError, ModelConfig
from arctic_jax.engine.config import (
    DEFAULT_CONTIGUOUS_PREFILL_MIN_TOKENS,
    EngineConfig,
    resolve_contiguous_prefill,
    resolve_kv_cache_dtype,
    resolve_scheduler_config,
)
from arctic_jax.engine.detokenizer import IncrementalDetokenizer
from arctic_jax.engine.metrics import EngineMetrics
from arctic_jax.engine.model_runner import ModelRunner
from arctic_jax.engine.request import FinishReason, Request, RequestOutput
from arctic_jax.engine.scheduler import ScheduledStep, Scheduler, StepUpdate
from arctic_jax.engine.step_failure import StepFailed
from arctic_jax.kv_cache import bytes_per_page
from arctic_jax.pytree import tree_nbytes
from arctic_jax.sampling import SamplingParams
from arctic_jax.speculative.factory import load_checked_draft_model, make_proposer
from arctic_jax.speculative.governor import GovernorConfig, SpeculationGovernor
from arctic_jax.speculative.stats import SpeculationStats
from arctic_jax.speculative.verify import preorder

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CONTIGUOUS_PREFILL_MIN_TOKENS", "EngineConfig", "LLMEngine",
           "resolve_contiguous_prefill", "resolve_kv_cache_dtype", "resolve_scheduler_config"]


def _live(step: ScheduledStep) -> list[Request]:
    """The requests of ``step`` not finished yet (those a failure of the step would end)."""
    return [c.request for c in step.chunks if not c.request.finished]


class LLMEngine:
    """Synchronous engine core. Not thread-safe: drive it from one thread."""

    def __init__(self, spec: Any, cfg: ModelConfig, weights: Any, tokenizer: Any,
                 config: EngineConfig | None = None, *, dtype: Any = None):
        """``spec``: the model's ``ModelSpec`` (its step and head functions); ``weights``: a
        pytree of its weights class for ``cfg``."""
        if getattr(spec, "task", "generate") == "embed":
            raise ConfigError(f"model {spec.name!r} is an embedding model; use arctic_jax.Embedder / "
                              "serve it for /v1/embeddings")
        config = config or EngineConfig()
        self.spec = spec
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.config = config
        dtype = dtype or jax.tree_util.tree_leaves(weights)[0].dtype
        self.kv_dtype = kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)
        self.sched_config = resolve_scheduler_config(cfg, config, kv_dtype, tree_nbytes(weights))
        eos = set(cfg.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.scheduler = Scheduler(self.sched_config, eos_token_ids=eos)
        attention_impl = config.attention_impl or default_attention_impl()
        spec_cfg = config.speculative_config
        draft_model = None
        if spec_cfg is not None and spec_cfg.uses_draft_model:
            draft_model = load_checked_draft_model(spec_cfg.model, cfg, dtype)
            spec_cfg = spec_cfg.with_draft_tokens(draft_model[0].n_predict)
            self.config = config = dataclasses.replace(config, speculative_config=spec_cfg)
        self.speculative = spec_cfg is not None
        self.proposer = make_proposer(spec_cfg) if spec_cfg is not None else None
        self.governor = (SpeculationGovernor(GovernorConfig(spec_cfg.adaptive_disable_batch_size))
                         if spec_cfg is not None else None)
        self._tree_drafts = bool(spec_cfg is not None and spec_cfg.suffix_use_tree_spec)
        rows_per_seq = 1 + spec_cfg.max_draft_tokens if spec_cfg is not None else 1
        self.runner = ModelRunner(spec, cfg, weights, self.sched_config, dtype=kv_dtype,
                                  attention_impl=attention_impl,
                                  num_top_logprobs=config.max_logprobs,
                                  token_buckets=config.token_buckets,
                                  page_buckets=config.page_buckets,
                                  parallel=config.parallel,
                                  contiguous_prefill_min_tokens=resolve_contiguous_prefill(
                                      config, attention_impl, dtype, cfg.head_dim),
                                  max_logits_rows=self.sched_config.max_num_seqs * rows_per_seq,
                                  speculative=spec_cfg is not None,
                                  tree_attention=self._tree_drafts,
                                  draft_model=draft_model,
                                  draft_tokens=spec_cfg.num_speculative_tokens if draft_model else 0,
                                  max_rows_per_seq=rows_per_seq)
        self.metrics = EngineMetrics()
        self.spec_stats = SpeculationStats()
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._inflight: tuple[ScheduledStep, Any, str, bool] | None = None
        self._counter = 0
        log.info("%s", self.kv_cache_summary())

    def kv_cache_summary(self) -> str:
        """What the KV cache reserved, in one line."""
        sc = self.sched_config
        size = sc.num_pages * bytes_per_page(self.cfg, sc.page_size, self.kv_dtype)
        return (f"KV cache {sc.num_pages} pages x {sc.page_size} tokens ({size / 2**30:.2f} GiB; "
                f"{self.cfg.num_cache_layers} cache layers for {self.cfg.num_layers} decoder "
                f"layers): {sc.num_pages // -(-sc.max_model_len // sc.page_size)} sequences of "
                f"max_model_len {sc.max_model_len} at once")

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

    def validate_params(self, params: SamplingParams) -> None:
        """Raise ValueError (naming the parameter) for sampling parameters this engine cannot run:
        ``n`` > 1 (expand with ``params.copies()``), logit-bias ids outside the vocabulary,
        penalties or a logit bias together with speculative decoding."""
        if params.n != 1:
            raise ValueError(f"SamplingParams.n={params.n}: the engine runs one sequence per "
                             "request; submit params.copies() (LLM.generate and "
                             "the server do)")
        params.check_vocab(self.cfg.vocab_size)
        if self.speculative and params.adjusts_logits():
            name = next(f for f, on in (("logit_bias", params.logit_bias),
                                        ("repetition_penalty", params.repetition_penalty != 1.0),
                                        ("frequency_penalty", params.frequency_penalty),
                                        ("presence_penalty", params.presence_penalty)) if on)
            raise ValueError(f"SamplingParams.{name}={getattr(params, name)!r}: penalties and "
                             "logit_bias are not supported with speculative decoding")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Queue a request; raises ValueError for one that can never run."""
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds the engine's max_logprobs "
                             f"{self.config.max_logprobs}")
        self.validate_prompt(prompt_ids)
        self.validate_params(params)
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
        its tokens are read first (see ``_read_first``); detokenization and the outputs
        still run after the next launch, while the device computes.

        A step whose model execution or host post-processing raises fails alone: its requests
        are aborted and ``StepFailed`` is raised (see ``_contain``); the engine goes on.
        """
        outputs: list[RequestOutput] = []
        read = read_live = None
        if self._inflight is not None and self._read_first(self._inflight[0]):
            inflight, self._inflight = self._inflight, None
            read_live = _live(inflight[0])
            try:
                read = self._read_step(*inflight)   # tokens only; the rest after the launch
            except Exception as e:
                raise self._contain(read_live, e) from e
        self._propose()
        self.scheduler.token_cap = self.runner.token_cap()
        step = self.scheduler.schedule()
        if self.scheduler.capped:
            self.metrics.steps_waiting_for_compilation.inc()
        self.metrics.preemptions.inc(len(step.preempted))
        launched = None
        if step.chunks:
            drafted = self.runner.draft_cfg is not None and bool(self._drafters())
            try:
                packed, variant = self.runner.dispatch(step, drafted)
            except Exception as e:
                raise self._contain(_live(step), e, (read, read_live)) from e
            launched = (step, packed, variant, drafted)
        previous, self._inflight = self._inflight, launched
        if read is not None:
            try:
                outputs = self._emit(*read)
            except Exception as e:
                raise self._contain(read_live, e) from e
        if previous is not None:
            live = _live(previous[0])
            try:
                outputs = self._emit(*self._read_step(*previous))
            except Exception as e:
                raise self._contain(live, e) from e
        self.metrics.on_step(self.scheduler)
        if self.governor is not None:
            self._govern(step, outputs)
        return outputs

    def _govern(self, step: ScheduledStep, outputs: list[RequestOutput]) -> None:
        """Tell the governor how the step went (its tokens and whether it prefilled are only
        counted while it governs: more running requests than ``adaptive_disable_batch_size``)."""
        running = len(self.scheduler.running)
        if not self.governor.governs(running):
            self.governor.on_step(0, running)
            return
        prefill = any(c.start < len(c.request.prompt_ids) for c in step.chunks)
        mode = self.governor.on_step(sum(len(o.new_token_ids) for o in outputs), running, prefill)
        self.metrics.spec_governed_steps.labels("true" if mode else "false").inc()

    def _contain(self, failed: list[Request], cause: Exception,
                 unemitted: tuple[Any, list[Request] | None] = (None, None)) -> StepFailed:
        """Fail one step alone (``failed``: its requests that were live when it failed);
        returns the ``StepFailed`` to raise.

        The requests are aborted (pages and token slots freed; see ``_fail``). ``unemitted``:
        a step whose tokens were applied but not yet detokenized, and its live requests
        (emitted now); ``self._inflight``: a step launched but not read. When the failure left
        the buffers carried between steps intact (it came before the programs consumed them,
        or after), that step stays in flight. When it did not (the KV cache was donated to a
        call that failed, or holds a failed computation's error), no KV in the cache can be
        trusted: the step in flight is read if its result survived (else its sampled tokens
        are rewound, to be computed again), every running request is preempted (recomputed
        from its host tokens), the prefix cache forgets its pages, and the runner re-allocates
        the buffers.
        """
        failed_ids: list[str] = []
        self._fail(failed, failed_ids)
        outputs: list[RequestOutput] = []
        read, read_live = unemitted
        if read is not None:
            outputs += self._settle(read_live, failed_ids, lambda: self._emit(*read))
        lost = self.runner.device_state_lost()
        if lost:
            unread, self._inflight = self._inflight, None
            if unread is not None:
                outputs += self._salvage(unread, failed_ids)
            self.scheduler.preempt_all()
            self.scheduler.allocator.forget_cached_pages()
            self.runner.reset_device_state()
        self.metrics.step_failures.inc()
        self.metrics.on_step(self.scheduler)
        return StepFailed(failed_ids, cause, outputs, device_state_lost=lost)

    def _fail(self, requests: list[Request], failed_ids: list[str]) -> None:
        """End the live requests of a failed step and add their ids to ``failed_ids``: an
        unfinished one is aborted; one that finished in the failed step (its final output
        never returned) is closed as finished."""
        for request in requests:
            if request.request_id in failed_ids:
                continue
            if not request.finished:
                self.abort(request.request_id)
            elif request.request_id in self._detok:
                self._on_finish(request)
            failed_ids.append(request.request_id)

    def _settle(self, live: list[Request], failed_ids: list[str], finish: Any) -> list[RequestOutput]:
        """``finish()``: the host work of another step during containment; if it raises too,
        that step's ``live`` requests fail as well."""
        try:
            return finish()
        except Exception:
            log.exception("finishing a step after another step failed")
            self._fail(live, failed_ids)
            return []

    def _salvage(self, inflight: tuple, failed_ids: list[str]) -> list[RequestOutput]:
        """Read a launched step after the device state was lost: its outputs if its result
        survived; else its sampled tokens are rewound (``pending``) to be computed again."""
        step, packed = inflight[0], inflight[1]
        try:
            jax.block_until_ready(packed)
        except Exception:
            log.warning("dropped the result of a step launched on the lost device state")
            for c in step.chunks:
                if c.sample and not c.request.finished:
                    c.request.pending -= 1
            return []
        live = _live(step)
        return self._settle(live, failed_ids, lambda: self._emit(*self._read_step(*inflight)))

    def _may_speculate(self, request: Request) -> bool:
        """Every request speculates when speculation is configured: verification is exact for
        greedy and for sampled requests (rejection sampling on the device)."""
        return self.speculative

    def _drafters(self) -> list[Request]:
        """The running requests allowed to draft now: all of them, none while more requests run
        than ``hard_disable_by_batch_size`` or while the governor finds that speculation does not
        pay (``adaptive_disable_batch_size``), and only the first N running while more than
        ``disable_by_batch_size`` = N run."""
        if not self.speculative or not self.governor.speculating:
            return []
        cfg = self.config.speculative_config
        running = self.scheduler.running
        if cfg.hard_disable_by_batch_size is not None and len(running) > cfg.hard_disable_by_batch_size:
            return []
        if cfg.disable_by_batch_size is not None:
            running = running[:cfg.disable_by_batch_size]
        return [r for r in running if self._may_speculate(r)]

    def _read_first(self, inflight: ScheduledStep) -> bool:
        """Whether to read the step in flight before scheduling the next: it samples for a
        request that may draft now. Steps of requests that do not draft keep overlapping."""
        drafters = {id(r) for r in self._drafters()}
        return bool(drafters) and any(c.sample and id(c.request) in drafters for c in inflight.chunks)

    def _propose(self) -> None:
        """Ask the proposer for drafts (at most k each) for the requests allowed to draft whose
        next chunk reaches their last token, known on the host (a decode, or the tokens a
        draft tree accepted past its first-child chain). Tree mode keeps whole trees, in
        depth-first order (``preorder``)."""
        ready = [r for r in self._drafters()
                 if not r.pending and len(r.prompt_ids) <= r.num_computed < r.num_tokens]
        if not ready:
            return
        k = self.config.speculative_config.num_speculative_tokens
        if self.runner.draft_cfg is not None:
            self._propose_with_model(ready)
            return
        if self._tree_drafts:
            for request, d in zip(ready, self.proposer.propose_drafts(ready, k), strict=True):
                request.spec_tokens, request.spec_parents = preorder(d.token_ids[:k], d.parents[:k])
            return
        for request, draft in zip(ready, self.proposer.propose(ready, k), strict=True):
            request.spec_tokens = list(draft)[:k]

    def _propose_with_model(self, ready: list[Request]) -> None:
        """Draft-model drafts (read back with the request's last step), or with suffix decoding
        on the suffix draft where it scores at least ``n_predict`` (Arctic's rule)."""
        cfg = self.config.speculative_config
        suffix: Sequence[Any] = [None] * len(ready)
        if self.proposer is not None:
            suffix = self.proposer.propose_drafts(ready, cfg.suffix_speculative_tokens)
        n_predict = self.runner.draft_cfg.n_predict
        for request, d in zip(ready, suffix, strict=True):
            if d is not None and d.token_ids and d.score >= n_predict:
                request.spec_tokens = list(d.token_ids)
            elif request.model_draft:
                request.spec_tokens = request.model_draft[:cfg.num_speculative_tokens]
                request.spec_from_model = True
            request.model_draft = []

    def _read_step(self, step: ScheduledStep, packed: Any, variant: str,
                   drafted: bool) -> tuple[ScheduledStep, StepUpdate, str, float]:
        """Wait for a step's result and apply its tokens to the scheduler (and keep the draft
        model's proposals of requests whose next chunk starts from this step's tokens)."""
        verify = any(c.draft for c in step.chunks)
        result = self.runner.fetch(packed, step.num_logits, verify, drafted)
        now = time.monotonic()
        update = self.scheduler.update(step, result.tokens, result.logprobs, result.top_logprobs,
                                       result.accepted)
        if self.runner.draft_cfg is not None:
            for e, chunk in enumerate(c for c in step.chunks if c.sample):
                request = chunk.request
                fresh = drafted and not request.finished and request.pending == 0
                request.model_draft = [int(t) for t in result.drafts[e]] if fresh else []
        return step, update, variant, now

    def _emit(self, step: ScheduledStep, update: StepUpdate, variant: str,
              now: float) -> list[RequestOutput]:
        """Detokenize a read step's new tokens (a stop string may end a request here) and build
        its outputs and metrics."""
        outputs = []
        num_generated = 0
        kept: dict[int, int] = {}   # id(request) -> tokens returned this step
        for request in update.touched:
            detok = self._detok.get(request.request_id)
            if detok is None:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
                self.metrics.on_first_token(request)
            new_ids = self._detokenize(request, detok)
            num_generated += len(new_ids)
            kept[id(request)] = len(new_ids)
            if self.proposer is not None:
                self.proposer.on_tokens(request, new_ids)
            outputs.append(self._output(request, detok, len(new_ids)))
            if request.finished:
                self._on_finish(request)
        if self.speculative:
            self._record_speculation(step, update, kept)
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

    def _record_speculation(self, step: ScheduledStep, update: StepUpdate,
                            kept: dict[int, int]) -> None:
        """Count this step's verified runs (tokens returned, after a stop string's truncation) and
        the plain decodes of requests that may speculate (tokens past the prompt only)."""
        plain = sum(1 for c in step.chunks
                    if c.sample and not c.draft and id(c.request) in kept
                    and c.start >= len(c.request.prompt_ids) and self._may_speculate(c.request))
        runs = []
        for v in update.verified:
            emitted = min(v.emitted, kept.get(id(v.request), v.emitted))
            self.spec_stats.on_verified(v.drafted, v.accepted, emitted, v.depth)
            runs.append((v.drafted, v.accepted, emitted, v.depth))
        self.metrics.on_verified_runs(runs)
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
