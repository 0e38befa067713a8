"""POST /v1/completions and /v1/chat/completions on an ``EngineFront`` (streaming over SSE or not).

Bodies are validated against ``schemas.py`` (one OpenAI-style 400 naming the parameter); then
what depends on the served model is checked: its names, the context length, the vocabulary,
``--max-logprobs``, and the parameters ``unsupported.py`` refuses today. A request whose client
goes away is aborted, so its KV pages are freed at once.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from arctic_jax.engine.choice_jobs import copy_jobs
from arctic_jax.engine.front import EngineFront
from arctic_jax.engine.request import CollectedOutput, RequestOutput
from arctic_jax.sampling import SamplingParams
from arctic_jax.serving.errors import APIError, sampling_error
from arctic_jax.serving.generations import (
    SSE_HEADERS,
    Generations,
    finish_reason_of,
    sse,
    sse_with_errors,
    until_disconnected,
    usage_of,
)
from arctic_jax.serving.logprobs import chat_logprobs, completion_logprobs
from arctic_jax.serving.openapi import generation_route_docs
from arctic_jax.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    RequestParseError,
    parse_request,
)
from arctic_jax.serving.schemas import ChatCompletionRequest, CompletionRequest
from arctic_jax.serving.state import ServerState
from arctic_jax.serving.unsupported import check_supported
from arctic_jax.tokenizer import encode_chat, encode_prompt

T = TypeVar("T")
RunInPool = Callable[..., Awaitable[Any]]

DEFAULT_COMPLETION_MAX_TOKENS = 16   # the OpenAI default for /v1/completions


def completions_router(state: ServerState, run_in_pool: RunInPool) -> APIRouter:
    """The two generation routes (mounted under /v1 with the app's auth); ``run_in_pool(fn,
    *args)`` runs tokenization off the event loop."""
    router = APIRouter()
    gate = state.shutdown_gate

    def check_common(body: Any) -> None:
        state.check_model(body.model)
        check_supported(body)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")

    def check_prompt(ids: Sequence[int], eng: EngineFront, param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty: it has no tokens", param=param,
                           code="empty_prompt")
        vocab = eng.limits().vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param=param)
        try:   # the ids are in range and there are some: what is left to fail is the length
            eng.validate_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None

    def resolve_max_tokens(requested: int | None, param: str, prompt_len: int,
                           eng: EngineFront, default: int | None) -> int:
        max_len = eng.limits().max_model_len
        room = max_len - prompt_len
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(400, f"this model's maximum context length is {max_len} tokens, but "
                                f"the prompt has {prompt_len} tokens and {param} is {requested} "
                                f"({prompt_len + requested} in all)", param=param,
                           code="context_length_exceeded")
        return requested

    def check_logprobs(n: int, param: str, eng: EngineFront) -> None:
        limit = eng.limits().max_logprobs
        if not 0 <= n <= limit:
            raise APIError(400, f"{param}={n} is out of range: this server returns at most "
                                f"{limit} top logprobs (see --max-logprobs)", param=param)

    def sampling(body: Any, max_tokens: int, max_tokens_param: str,
                 logprobs: int | None, eng: EngineFront) -> SamplingParams:
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None else body.top_k,
                min_p=0.0 if body.min_p is None else body.min_p,
                seed=body.seed, stop=body.stop or (),
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=bool(body.ignore_eos), logprobs=logprobs, n=body.n or 1,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=body.repetition_penalty or 1.0,
                logit_bias={int(t): b for t, b in (body.logit_bias or {}).items()})
            params.check_vocab(eng.limits().vocab_size)
            return params
        except ValueError as e:
            raise sampling_error(e, {"max_tokens": max_tokens_param}) from None

    async def parse(request: Request, model: type[T]) -> T:
        try:
            return parse_request(model, await request.body())
        except RequestParseError as e:
            raise APIError(400, str(e), param=e.param) from None

    async def run(request: Request, gens: Generations, stream: bool,
                  events: Callable[[], AsyncIterator[str]],
                  respond: Callable[[dict[int, CollectedOutput]], Any]) -> Response:
        """Start ``gens``; stream ``events()`` or collect and ``respond``; abort on disconnect."""
        streaming = False
        try:
            await until_disconnected(request, gens.start(), gate)
            if stream:
                streaming = True
                return StreamingResponse(sse_with_errors(gens, events()),
                                         media_type="text/event-stream", headers=SSE_HEADERS,
                                         background=BackgroundTask(gens.close))

            async def collect() -> dict[int, CollectedOutput]:
                acc: dict[int, CollectedOutput] = {}
                async for index, out in gens.outputs():
                    acc.setdefault(index, CollectedOutput()).add(out)
                return acc

            acc = await until_disconnected(request, collect(), gate)
            return Response(respond(acc).model_dump_json(), media_type="application/json")
        finally:
            if not streaming:
                gens.close()

    @router.post("/completions", **generation_route_docs(CompletionRequest, CompletionResponse,
                                                          CompletionResponse))
    async def completions(request: Request) -> Response:
        eng: EngineFront = state.require("generate", "/v1/completions")
        body = await parse(request, CompletionRequest)
        check_common(body)
        if body.logprobs is not None:
            check_logprobs(body.logprobs, "logprobs", eng)
        prompts: list[str | list[int]]
        if isinstance(body.prompt, str) or isinstance(body.prompt[0], int):
            prompts = [body.prompt]
        else:
            prompts = list(body.prompt)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = []
        for i, prompt in enumerate(prompts):
            ids = await run_in_pool(encode_prompt, state.tokenizer, prompt) \
                if isinstance(prompt, str) else list(prompt)
            check_prompt(ids, eng, "prompt")
            max_tokens = resolve_max_tokens(body.max_tokens, "max_tokens", len(ids), eng,
                                            DEFAULT_COMPLETION_MAX_TOKENS)
            params = sampling(body, max_tokens, "max_tokens", body.logprobs, eng)
            jobs += copy_jobs(i * params.n, f"{request_id}-{i}", ids, params)
        gens = Generations(eng, jobs, gate)
        n = body.n or 1
        model = state.served_model_name
        tt = state.token_texts
        want_lp = body.logprobs is not None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def respond(acc: dict[int, CollectedOutput]) -> CompletionResponse:
            choices = []
            for i in range(len(jobs)):
                a = acc[i]
                lp = completion_logprobs(tt, a.token_ids, a.logprobs, a.top_logprobs, 0)[0] \
                    if want_lp else None
                choices.append(CompletionChoice(index=i, text=a.text, logprobs=lp,
                                                finish_reason=finish_reason_of(a.last)))
            return CompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage_of([acc[i].last for i in range(len(jobs))], n))

        async def events() -> AsyncIterator[str]:
            offsets = [0] * len(jobs)
            lasts: dict[int, RequestOutput] = {}
            async for i, out in gens.outputs():
                lasts[i] = out
                lp = None
                if want_lp:
                    lp, offsets[i] = completion_logprobs(tt, out.new_token_ids, out.new_logprobs,
                                                          out.new_top_logprobs, offsets[i])
                if out.new_text or (want_lp and out.new_token_ids) or out.finished:
                    yield sse(CompletionResponse(
                        id=request_id, model=model,
                        choices=[CompletionChoice(index=i, text=out.new_text, logprobs=lp,
                                                  finish_reason=finish_reason_of(out))]))
            if include_usage:
                yield sse(CompletionResponse(id=request_id, model=model, choices=[],
                                              usage=usage_of([lasts[i] for i in range(len(jobs))], n)))

        return await run(request, gens, bool(body.stream), events, respond)

    @router.post("/chat/completions", **generation_route_docs(
        ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(request: Request) -> Response:
        eng: EngineFront = state.require("generate", "/v1/chat/completions")
        body = await parse(request, ChatCompletionRequest)
        check_common(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        n_top = body.top_logprobs or 0
        if body.logprobs:
            check_logprobs(n_top, "top_logprobs", eng)
        conversation = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()} for m in body.messages]
        try:
            ids = await run_in_pool(encode_chat, state.tokenizer, conversation)
        except Exception as e:  # template errors are the request's fault
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        check_prompt(ids, eng, "messages")
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        max_tokens = resolve_max_tokens(requested, param, len(ids), eng, None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        params = sampling(body, max_tokens, param, n_top if body.logprobs else None, eng)
        jobs = copy_jobs(0, request_id, ids, params)
        gens = Generations(eng, jobs, gate)
        model = state.served_model_name
        tt = state.token_texts
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def respond(acc: dict[int, CollectedOutput]) -> ChatCompletionResponse:
            choices = []
            for i in range(len(jobs)):
                a = acc[i]
                lp = chat_logprobs(tt, a.token_ids, a.logprobs, a.top_logprobs) \
                    if body.logprobs else None
                choices.append(ChatChoice(index=i, message=AssistantMessage(content=a.text),
                                          logprobs=lp, finish_reason=finish_reason_of(a.last)))
            return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                          usage=usage_of([acc[i].last for i in range(len(jobs))],
                                                         len(jobs)))

        async def events() -> AsyncIterator[str]:
            def chunk(i: int, delta: DeltaMessage, lp: ChatLogprobs | None = None,
                      finish: str | None = None) -> str:
                return sse(ChatCompletionChunk(id=request_id, model=model, choices=[
                    ChatChunkChoice(index=i, delta=delta, logprobs=lp, finish_reason=finish)]))

            for i in range(len(jobs)):
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            lasts: dict[int, RequestOutput] = {}
            async for i, out in gens.outputs():
                lasts[i] = out
                if out.new_text or (body.logprobs and out.new_token_ids):
                    lp = chat_logprobs(tt, out.new_token_ids, out.new_logprobs,
                                        out.new_top_logprobs) if body.logprobs else None
                    yield chunk(i, DeltaMessage(content=out.new_text), lp)
                if out.finished:
                    yield chunk(i, DeltaMessage(), finish=finish_reason_of(out))
            if include_usage:
                yield sse(ChatCompletionChunk(id=request_id, model=model, choices=[],
                                               usage=usage_of([lasts[i] for i in range(len(jobs))],
                                                              len(jobs))))

        return await run(request, gens, bool(body.stream), events, respond)

    return router
