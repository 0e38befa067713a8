"""The OpenAI-compatible HTTP API on top of an ``AsyncEngine`` (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming over
SSE or not), GET /v1/models, GET /health, GET /metrics. Errors use the OpenAI
body ``{"error": {"message", "type", "param", "code"}}``. A request whose
client goes away is aborted, so its KV pages are freed at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from arctic_jax.engine.async_engine import AsyncEngine, QueueFullError
from arctic_jax.engine.request import CollectedOutput, RequestOutput
from arctic_jax.sampling import SamplingParams
from arctic_jax.serving.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatLogprobs, CompletionChoice, CompletionLogprobs, CompletionRequest,
    CompletionResponse, DeltaMessage, ErrorInfo, ErrorResponse, ModelCard, ModelList,
    PromptTokensDetails, RequestParseError, TokenLogprob, TopLogprob, Usage, parse_request)
from arctic_jax.tokenizer import encode_chat, encode_prompt

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_COMPLETION_MAX_TOKENS = 16   # the OpenAI default for /v1/completions
RETRY_AFTER_S = 1                    # Retry-After sent with 429 (queue full)
DISCONNECT_POLL_S = 0.2              # how often a non-streaming request checks its client


# ----------------------------------------------------------------- state
@dataclasses.dataclass
class ServerState:
    """What the routes need. ``engine`` stays None (503) until the model is loaded and warm."""

    served_model_name: str | None = None
    api_key: str | None = None
    engine: AsyncEngine | None = None
    tokenizer: Any = None
    startup_error: str | None = None
    token_texts: "_TokenTexts | None" = None

    def set_ready(self, engine: AsyncEngine, tokenizer: Any, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.token_texts = _TokenTexts(tokenizer)
        if self.served_model_name is None:
            self.served_model_name = model_name
        self.engine = engine  # last: readiness is "engine is not None"


# ----------------------------------------------------------------- errors
class APIError(Exception):
    """An error returned to the client as an OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type,
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status,
                            headers=self.headers)


class _ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def _engine_error(exc: BaseException) -> APIError:
    """The API error for an exception raised by ``AsyncEngine.generate``."""
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is busy ({exc}); retry later", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, f"engine failure: {exc}", type="server_error", code="engine_failure")


def _sampling_error(exc: ValueError, rename: dict[str, str]) -> APIError:
    """SamplingParams raises "SamplingParams.<field>=<value>: why"; name the request field."""
    message = str(exc)
    m = re.match(r"SamplingParams\.(\w+)=", message)
    param = None
    if m:
        param = rename.get(m.group(1), m.group(1))
        message = param + message[m.end(1):]
    return APIError(400, message, param=param)


# ------------------------------------------------------- engine requests
@dataclasses.dataclass(frozen=True)
class _Job:
    index: int            # choice index in the response
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class _Generations:
    """Several engine requests run concurrently; their outputs merged in arrival order.

    ``start`` submits every request and waits for each one's first output, so
    that a rejected request (queue full, invalid) becomes an HTTP error before
    any response is sent. ``close`` aborts whatever has not finished.
    """

    def __init__(self, engine: AsyncEngine, jobs: Sequence[_Job]):
        self._engine = engine
        self._jobs = list(jobs)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffered: list[tuple[int, RequestOutput]] = []
        self._unfinished = {job.index for job in jobs}

    async def _pump(self, job: _Job) -> None:
        stream = self._engine.generate(job.prompt_ids, job.params, job.request_id)
        try:
            async for out in stream:
                self._queue.put_nowait((job.index, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((job.index, e))
        finally:
            await stream.aclose()  # aborts the request if it has not finished

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._pump(job)) for job in self._jobs]
        started: set[int] = set()
        try:
            while len(started) < len(self._jobs):
                index, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise _engine_error(item)
                self._buffered.append((index, item))
                started.add(index)
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) pairs until every request has finished."""
        while self._unfinished:
            if self._buffered:
                index, item = self._buffered.pop(0)
            else:
                index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise _engine_error(item)
            if item.finished:
                self._unfinished.discard(index)
            yield index, item

    def close(self) -> None:
        """Abort unfinished requests (idempotent, never blocks)."""
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for job in self._jobs:
            if job.index in self._unfinished:
                self._engine.abort(job.request_id)
        self._unfinished.clear()


T = TypeVar("T")


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` but give up (cancelling it) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()


def _usage(lasts: Sequence[RequestOutput]) -> Usage:
    prompt = sum(o.num_prompt_tokens for o in lasts)
    completion = sum(o.num_output_tokens for o in lasts)
    cached = sum(o.num_cached_tokens for o in lasts)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _finish_reason(out: RequestOutput) -> str | None:
    return out.finish_reason.value if out.finished and out.finish_reason else None


# ----------------------------------------------------------- logprobs
class _TokenTexts:
    """Text of single tokens for logprobs (special tokens shown), memoised per token id."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def _completion_logprobs(texts: _TokenTexts, ids: Sequence[int], lps: Sequence[float],
                         tops: Sequence[Sequence[tuple[int, float]]], offset: int
                         ) -> tuple[CompletionLogprobs, int]:
    """Legacy logprobs of ``ids``; offsets count from ``offset``. Returns it and the next offset."""
    out = CompletionLogprobs()
    for k, (tid, lp) in enumerate(zip(ids, lps)):
        token = texts(tid)
        top = {texts(t): float(v) for t, v in (tops[k] if k < len(tops) else ())}
        top.setdefault(token, float(lp))  # the chosen token is always listed
        out.tokens.append(token)
        out.token_logprobs.append(float(lp))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out, offset


def _chat_logprobs(texts: _TokenTexts, ids: Sequence[int], lps: Sequence[float],
                   tops: Sequence[Sequence[tuple[int, float]]]) -> ChatLogprobs:
    content = []
    for k, (tid, lp) in enumerate(zip(ids, lps)):
        token = texts(tid)
        top = [TopLogprob(token=texts(t), logprob=float(v), bytes=list(texts(t).encode()))
               for t, v in (tops[k] if k < len(tops) else ())]
        content.append(TokenLogprob(token=token, logprob=float(lp), bytes=list(token.encode()),
                                    top_logprobs=top))
    return ChatLogprobs(content=content)


# ------------------------------------------------------------ SSE helpers
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_DONE = "data: [DONE]\n\n"


def _sse(payload: Any) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _sse_with_errors(gens: _Generations, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Forward ``events`` then ``[DONE]``; an error after the headers went out becomes an SSE
    error event. Leaving early (client gone) aborts the requests."""
    try:
        async for event in events:
            yield event
        yield _SSE_DONE
    except APIError as e:
        yield _sse(e.body())
        yield _SSE_DONE
    except Exception as e:  # noqa: BLE001 - the status line is already sent
        log.exception("streaming response failed")
        yield _sse(APIError(500, f"internal error: {e}", type="server_error").body())
        yield _SSE_DONE
    finally:
        gens.close()


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

    @app.exception_handler(_ClientDisconnected)
    async def _on_disconnect(request: Request, exc: _ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                        type="server_error").response()

    # ------------------------------------------------------------- helpers
    def engine() -> AsyncEngine:
        eng = state.engine
        if eng is None:
            why = state.startup_error or "the model is still loading"
            raise APIError(503, f"the server is not ready: {why}", type="server_error",
                           code="not_ready")
        if not eng.alive:
            raise APIError(500, f"engine failure: {eng.error}", type="server_error",
                           code="engine_failure")
        return eng

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
        if body.model != state.served_model_name:
            raise APIError(400, f"the model '{body.model}' does not exist; this server serves "
                                f"'{state.served_model_name}'", param="model",
                           code="model_not_found")
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

    def check_prompt(ids: Sequence[int], eng: AsyncEngine, param: str) -> None:
        vocab = eng.engine.cfg.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param=param)
        try:
            eng.engine.scheduler.validate(len(ids))
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None

    def resolve_max_tokens(requested: int | None, param: str, prompt_len: int,
                           eng: AsyncEngine, default: int | None) -> int:
        max_len = eng.engine.sched_config.max_model_len
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

    def check_logprobs(n: int, param: str, eng: AsyncEngine) -> None:
        limit = eng.engine.config.max_logprobs
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
            raise _sampling_error(e, {"max_tokens": max_tokens_param}) from None

    async def parse(request: Request, model: type[T]) -> T:
        try:
            return parse_request(model, await request.body())
        except RequestParseError as e:
            raise APIError(400, str(e), param=e.param) from None

    async def run(request: Request, gens: _Generations, stream: bool,
                  events: Callable[[], AsyncIterator[str]],
                  respond: Callable[[dict[int, CollectedOutput]], Any]) -> Response:
        """Start ``gens``; stream ``events()`` or collect and ``respond``; abort on disconnect."""
        streaming = False
        try:
            await _until_disconnected(request, gens.start())
            if stream:
                streaming = True
                return StreamingResponse(_sse_with_errors(gens, events()),
                                         media_type="text/event-stream", headers=_SSE_HEADERS,
                                         background=BackgroundTask(gens.close))

            async def collect() -> dict[int, CollectedOutput]:
                acc: dict[int, CollectedOutput] = {}
                async for index, out in gens.outputs():
                    acc.setdefault(index, CollectedOutput()).add(out)
                return acc

            acc = await _until_disconnected(request, collect())
            return Response(respond(acc).model_dump_json(), media_type="application/json")
        finally:
            if not streaming:
                gens.close()

    # -------------------------------------------------------------- routes
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_auth)])

    @v1.get("/models")
    async def list_models() -> JSONResponse:
        eng = engine()
        card = ModelCard(id=state.served_model_name,
                         max_model_len=eng.engine.sched_config.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        eng = engine()
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
            jobs.append(_Job(i, f"{request_id}-{i}", ids,
                             sampling(body, max_tokens, "max_tokens", body.logprobs)))
        gens = _Generations(eng, jobs)
        model = state.served_model_name
        tt = state.token_texts
        want_lp = body.logprobs is not None
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def respond(acc: dict[int, CollectedOutput]) -> CompletionResponse:
            choices = []
            for i in range(len(jobs)):
                a = acc[i]
                lp = _completion_logprobs(tt, a.token_ids, a.logprobs, a.top_logprobs, 0)[0] \
                    if want_lp else None
                choices.append(CompletionChoice(index=i, text=a.text, logprobs=lp,
                                                finish_reason=_finish_reason(a.last)))
            return CompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=_usage([acc[i].last for i in range(len(jobs))]))

        async def events() -> AsyncIterator[str]:
            offsets = [0] * len(jobs)
            lasts: dict[int, RequestOutput] = {}
            async for i, out in gens.outputs():
                lasts[i] = out
                lp = None
                if want_lp:
                    lp, offsets[i] = _completion_logprobs(tt, out.new_token_ids, out.new_logprobs,
                                                          out.new_top_logprobs, offsets[i])
                if out.new_text or (want_lp and out.new_token_ids) or out.finished:
                    yield _sse(CompletionResponse(
                        id=request_id, model=model,
                        choices=[CompletionChoice(index=i, text=out.new_text, logprobs=lp,
                                                  finish_reason=_finish_reason(out))]))
            if include_usage:
                yield _sse(CompletionResponse(id=request_id, model=model, choices=[],
                                              usage=_usage([lasts[i] for i in range(len(jobs))])))

        return await run(request, gens, bool(body.stream), events, respond)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        eng = engine()
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
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        check_prompt(ids, eng, "messages")
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        requested = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        max_tokens = resolve_max_tokens(requested, param, len(ids), eng, None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        params = sampling(body, max_tokens, param, n_top if body.logprobs else None)
        gens = _Generations(eng, [_Job(0, request_id, ids, params)])
        model = state.served_model_name
        tt = state.token_texts
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def respond(acc: dict[int, CollectedOutput]) -> ChatCompletionResponse:
            a = acc[0]
            lp = _chat_logprobs(tt, a.token_ids, a.logprobs, a.top_logprobs) if body.logprobs \
                else None
            choice = ChatChoice(index=0, message=AssistantMessage(content=a.text),
                                logprobs=lp, finish_reason=_finish_reason(a.last))
            return ChatCompletionResponse(id=request_id, model=model, choices=[choice],
                                          usage=_usage([a.last]))

        async def events() -> AsyncIterator[str]:
            def chunk(delta: DeltaMessage, lp: ChatLogprobs | None = None,
                      finish: str | None = None) -> str:
                return _sse(ChatCompletionChunk(id=request_id, model=model, choices=[
                    ChatChunkChoice(index=0, delta=delta, logprobs=lp, finish_reason=finish)]))

            yield chunk(DeltaMessage(role="assistant", content=""))
            last = None
            async for _, out in gens.outputs():
                last = out
                if out.new_text or (body.logprobs and out.new_token_ids):
                    lp = _chat_logprobs(tt, out.new_token_ids, out.new_logprobs,
                                        out.new_top_logprobs) if body.logprobs else None
                    yield chunk(DeltaMessage(content=out.new_text), lp)
                if out.finished:
                    yield chunk(DeltaMessage(), finish=_finish_reason(out))
            if include_usage:
                yield _sse(ChatCompletionChunk(id=request_id, model=model, choices=[],
                                               usage=_usage([last])))

        return await run(request, gens, bool(body.stream), events, respond)

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
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        eng = state.engine
        if eng is None:
            return Response("the model is still loading\n", 503, media_type="text/plain")
        return Response(eng.engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app
