"""The OpenAI-compatible HTTP API on top of an ``EngineFront``: an ``AsyncEngine``, or a
``ReplicaRouter`` over data-parallel replicas (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming over
SSE or not), POST /v1/embeddings (an embedding model's server, ``embeddings.py``;
each model answers only its task's routes), GET /v1/models, GET /health,
GET /metrics. Errors use the OpenAI
body ``{"error": {"message", "type", "param", "code"}}``. A request whose
client goes away is aborted, so its KV pages are freed at once.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from arctic_jax.engine.front import EngineFront
from arctic_jax.engine.request import CollectedOutput, RequestOutput
from arctic_jax.sampling import SamplingParams
from arctic_jax.serving.embeddings import embeddings_router
from arctic_jax.serving.errors import APIError, ClientDisconnected, sampling_error
from arctic_jax.serving.generations import (
    SSE_HEADERS,
    Generations,
    Job,
    finish_reason_of,
    sse,
    sse_with_errors,
    until_disconnected,
    usage_of,
)
from arctic_jax.serving.logprobs import chat_logprobs, completion_logprobs
from arctic_jax.serving.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    RequestParseError,
    parse_request,
)
from arctic_jax.serving.state import ServerState
from arctic_jax.tokenizer import encode_chat, encode_prompt

log = logging.getLogger(__name__)
T = TypeVar("T")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_COMPLETION_MAX_TOKENS = 16   # the OpenAI default for /v1/completions


__all__ = ["ServerState", "create_app"]


# ------------------------------------------------------------------ app
def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state`` (which may become ready after the app starts)."""
    tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arctic-tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="arctic-jax", lifespan=lifespan)

    # ------------------------------------------------------- error handlers
    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        loc = [str(x) for x in errors[0].get("loc", ())] if errors else []
        param = loc[-1] if loc else None
        msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return APIError(400, f"{'.'.join(loc)}: {msg}" if loc else msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(ClientDisconnected)
    async def _on_disconnect(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                        type="server_error").response()

    # ------------------------------------------------------------- helpers
    async def check_auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                   state.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def run_in_pool(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    def check_common(body: Any) -> None:
        state.check_model(body.model)
        if body.n not in (None, 1):
            raise APIError(400, f"n={body.n} is not supported: this server returns one choice "
                                "per prompt (n=1)", param="n", code="unsupported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0)", param=name,
                               code="unsupported")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias",
                           code="unsupported")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")

    def check_prompt(ids: Sequence[int], eng: EngineFront, param: str) -> None:
        vocab = eng.limits().vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param=param)
        try:   # the ids are in range, so what is left to fail is the length
            eng.validate_prompt(ids)
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None

    def resolve_max_tokens(requested: int | None, param: str, prompt_len: int,
                           eng: EngineFront, default: int | None) -> int:
        max_len = eng.limits().max_model_len
        room = max_len - prompt_len
        if requested is None:
            return room if default is None else min(default, room)
        if requested < 1:
            raise APIError(400, f"{param} must be at least 1, got {requested}", param=param)
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
                 logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k is None else body.top_k,
                min_p=0.0 if body.min_p is None else body.min_p,
                seed=body.seed, stop=body.stop or (),
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=bool(body.ignore_eos), logprobs=logprobs)
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
            await until_disconnected(request, gens.start())
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

            acc = await until_disconnected(request, collect())
            return Response(respond(acc).model_dump_json(), media_type="application/json")
        finally:
            if not streaming:
                gens.close()

    # -------------------------------------------------------------- routes
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_auth)])

    @v1.get("/models")
    async def list_models() -> JSONResponse:
        eng = state.ready_engine()
        max_model_len = eng.limits().max_model_len
        cards = [ModelCard(id=name, max_model_len=max_model_len) for name in state.model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        eng: EngineFront = state.require("generate", "/v1/completions")
        body = await parse(request, CompletionRequest)
        check_common(body)
        for name in ("echo", "suffix"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported", param=name, code="unsupported")
        if body.best_of not in (None, 1):
            raise APIError(400, f"best_of={body.best_of} is not supported (only 1)",
                           param="best_of", code="unsupported")
        if body.logprobs is not None:
            check_logprobs(body.logprobs, "logprobs", eng)
        prompts: list[str | list[int]]
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
            prompts = [body.prompt]
        else:
            prompts = list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list", param="prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = []
        for i, prompt in enumerate(prompts):
            ids = await run_in_pool(encode_prompt, state.tokenizer, prompt) \
                if isinstance(prompt, str) else list(prompt)
            check_prompt(ids, eng, "prompt")
            max_tokens = resolve_max_tokens(body.max_tokens, "max_tokens", len(ids), eng,
                                            DEFAULT_COMPLETION_MAX_TOKENS)
            jobs.append(Job(i, f"{request_id}-{i}", ids,
                             sampling(body, max_tokens, "max_tokens", body.logprobs)))
        gens = Generations(eng, jobs)
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
                                      usage=usage_of([acc[i].last for i in range(len(jobs))]))

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
                                              usage=usage_of([lasts[i] for i in range(len(jobs))])))

        return await run(request, gens, bool(body.stream), events, respond)

    @v1.post("/chat/completions")
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
        params = sampling(body, max_tokens, param, n_top if body.logprobs else None)
        gens = Generations(eng, [Job(0, request_id, ids, params)])
        model = state.served_model_name
        tt = state.token_texts
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def respond(acc: dict[int, CollectedOutput]) -> ChatCompletionResponse:
            a = acc[0]
            lp = chat_logprobs(tt, a.token_ids, a.logprobs, a.top_logprobs) if body.logprobs \
                else None
            choice = ChatChoice(index=0, message=AssistantMessage(content=a.text),
                                logprobs=lp, finish_reason=finish_reason_of(a.last))
            return ChatCompletionResponse(id=request_id, model=model, choices=[choice],
                                          usage=usage_of([a.last]))

        async def events() -> AsyncIterator[str]:
            def chunk(delta: DeltaMessage, lp: ChatLogprobs | None = None,
                      finish: str | None = None) -> str:
                return sse(ChatCompletionChunk(id=request_id, model=model, choices=[
                    ChatChunkChoice(index=0, delta=delta, logprobs=lp, finish_reason=finish)]))

            yield chunk(DeltaMessage(role="assistant", content=""))
            last = None
            async for _, out in gens.outputs():
                last = out
                if out.new_text or (body.logprobs and out.new_token_ids):
                    lp = chat_logprobs(tt, out.new_token_ids, out.new_logprobs,
                                        out.new_top_logprobs) if body.logprobs else None
                    yield chunk(DeltaMessage(content=out.new_text), lp)
                if out.finished:
                    yield chunk(DeltaMessage(), finish=finish_reason_of(out))
            if include_usage:
                yield sse(ChatCompletionChunk(id=request_id, model=model, choices=[],
                                               usage=usage_of([last])))

        return await run(request, gens, bool(body.stream), events, respond)

    v1.include_router(embeddings_router(state))
    app.include_router(v1)

    # ------------------------------------------------------ health, metrics
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is None:
            if state.startup_error:
                return JSONResponse({"status": "failed", "error": state.startup_error}, 503)
            return JSONResponse({"status": "loading"}, 503)
        if not state.engine.alive:
            return JSONResponse({"status": "engine_failed", "error": str(state.engine.error)}, 503)
        failed = state.engine.failed_replicas if state.task == "generate" else []
        if failed:   # data-parallel: the others still serve
            return JSONResponse({"status": "degraded", "failed_replicas": failed,
                                 "error": str(state.engine.error)})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        eng = state.engine
        if eng is None:
            return Response("the model is still loading\n", 503, media_type="text/plain")
        return Response(eng.render_metrics(), media_type=METRICS_CONTENT_TYPE)

    return app
