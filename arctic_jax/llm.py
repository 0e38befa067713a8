"""The offline library API: ``LLM(model=...).generate(...)`` and ``.chat(...)``."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from arctic_jax.engine.choice_jobs import Job, copy_jobs, start_order
from arctic_jax.engine.compilation_cache import AUTO, configure_compilation_cache
from arctic_jax.engine.engine import EngineConfig, LLMEngine
from arctic_jax.engine.request import CollectedOutput
from arctic_jax.sampling import SamplingParams
from arctic_jax.tokenizer import Conversation, encode_chat, encode_prompt
from checkpoints.loader import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    """One finished generation."""

    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" or "length"
    logprobs: list[float]
    index: int = 0              # which of the prompt's ``SamplingParams.n`` copies


class LLM:
    """Loads a model and runs batched generation through the continuous-batching engine.

    ``model`` is an HF checkpoint directory, a ``.gguf`` file, or ``"default"``/None
    for the embedded SmolLM2-135M-Instruct. Engine limits (``max_num_seqs``,
    ``max_num_batched_tokens``, ``max_model_len``, ``page_size``, ``num_pages`` ...)
    are keyword arguments, see ``EngineConfig``. Parallelism: ``tensor_parallel_size``,
    ``sequence_parallel_size``, ``enable_shift_parallel``, ``shift_parallel_threshold``
    (tokens, or "auto" to calibrate at warm-up) and the ``parallel_mode`` shortcut.
    ``compilation_cache_dir``: the persistent compilation cache, "auto" (the default: under
    ``$ARCTIC_JAX_CACHE``, keyed by jax version and device), "none" (or None) for none, or a
    directory (``arctic_jax.engine.compilation_cache``); ``compilation_cache`` counts the
    programs it loaded and those compiled since.
    """

    def __init__(self, model: str | None = "default", *, dtype: Any = None,
                 cache_dir: str | None = None, compilation_cache_dir: str | None = AUTO,
                 **engine_kwargs: Any):
        import checkpoints

        self.compilation_cache = configure_compilation_cache(compilation_cache_dir)
        loaded = checkpoints.load_model(model, dtype=dtype, cache_dir=cache_dir)
        self.model_name = loaded.name
        self.config = loaded.config
        src = loaded.tokenizer_source
        self.tokenizer = load_tokenizer(src.path, src.gguf_file)
        self.engine = LLMEngine(loaded.spec, loaded.config, loaded.weights, self.tokenizer,
                                EngineConfig.from_flags(**engine_kwargs))
        if self.engine.runner.needs_calibration:
            self.engine.runner.warmup()  # "auto" shift threshold: time both variants now

    # -------------------------------------------------------------- helpers
    def _params_list(self, params: SamplingParams | Sequence[SamplingParams] | None,
                     n: int) -> list[SamplingParams]:
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params

    # ------------------------------------------------------------------ API
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[CompletionOutput]:
        """Generate for each prompt (text, or a list of token ids): ``n`` outputs per prompt
        (``SamplingParams.n``, copy i seeded seed + i), prompt by prompt, in copy order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_ids = [encode_prompt(self.tokenizer, p) if isinstance(p, str) else [int(t) for t in p]
                      for p in prompts]
        return self._generate_ids(prompt_ids, self._params_list(sampling_params, len(prompt_ids)))

    def chat(self, conversations: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
             ) -> list[CompletionOutput]:
        """Reply to each conversation (a list of {"role", "content"} messages)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # a single conversation
        prompt_ids = [encode_chat(self.tokenizer, c) for c in conversations]
        return self._generate_ids(prompt_ids, self._params_list(sampling_params, len(prompt_ids)))

    def _generate_ids(self, prompt_ids: list[list[int]],
                      params: list[SamplingParams]) -> list[CompletionOutput]:
        """Every prompt's ``n`` choices as jobs (``engine.choice_jobs``: copy 0 at once, the
        others after its first output, when the prompt's KV pages are in the prefix cache);
        the outputs in prompt and copy order."""
        for ids, p in zip(prompt_ids, params, strict=True):  # reject bad input before queueing any
            self.engine.validate_prompt(ids)
            self.engine.validate_params(p.copies()[0])
        jobs: list[Job] = []
        for ids, p in zip(prompt_ids, params, strict=True):
            jobs += copy_jobs(len(jobs), self.engine.new_request_id(), ids, p)
        now, waiting = start_order(jobs)
        of_request = {job.request_id: job for job in jobs}
        collected = {job.index: CollectedOutput() for job in jobs}
        pending = {self.engine.add_request(job.prompt_ids, job.params, job.request_id) for job in now}
        while pending:
            if not self.engine.has_unfinished():
                raise RuntimeError("the engine stopped with requests unfinished")
            for out in self.engine.step():
                job = of_request.get(out.request_id)
                if job is None:
                    continue
                collected[job.index].add(out)
                if out.finished:
                    pending.discard(out.request_id)
                pending.update(self.engine.add_request(j.prompt_ids, j.params, j.request_id)
                               for j in waiting.pop(job.index, ()))
        return [CompletionOutput(prompt_token_ids=job.prompt_ids, text=collected[job.index].text,
                                 token_ids=collected[job.index].token_ids,
                                 finish_reason=collected[job.index].finish_reason,
                                 logprobs=collected[job.index].logprobs,
                                 index=job.copy)
                for job in jobs]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[str]:
        """Yield text pieces of one generation as they are produced."""
        rid = self.engine.add_request(list(prompt_ids), params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.new_text:
                        yield out.new_text
                    if out.finished:
                        self.last_finish_reason = out.finish_reason.value
                        return
        finally:
            if self.engine.scheduler.requests.get(rid) is not None:
                self.engine.abort(rid)
            while self.engine.has_unfinished() and not self.engine.scheduler.has_work():
                self.engine.step()  # drain the in-flight step
