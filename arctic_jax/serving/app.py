"""The OpenAI-compatible HTTP API on top of an ``EngineFront``: an ``AsyncEngine``, or a
``ReplicaRouter`` over data-parallel replicas (FastAPI).

Routes: POST /v1/completions, POST /v1/chat/completions (``completions.py``; both streaming
over SSE or not), POST /v1/embeddings (an embedding model's server, ``embeddings.py``; each
model answers only its task's routes), GET /v1/models, GET /health, GET /metrics, and the
OpenAPI document (``openapi.py``) at /openapi.json. Errors use the OpenAI body
``{"error": {"message", "type", "param", "code"}}``. Request bodies above
``state.max_request_bytes`` get 413 before they are parsed (``request_limits.py``); while a
graceful shutdown drains, new requests get 503 (``shutdown.py``).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from arctic_jax.serving.completions import completions_router
from arctic_jax.serving.embeddings import embeddings_router
from arctic_jax.serving.errors import APIError, ClientDisconnected
from arctic_jax.serving.openapi import error_responses, openapi_document
from arctic_jax.serving.protocol import HealthStatus, ModelCard, ModelList
from arctic_jax.serving.request_limits import BodySizeLimit
from arctic_jax.serving.server_replicas import ReplicaHeader
from arctic_jax.serving.shutdown import DrainMiddleware
from arctic_jax.serving.state import ServerState

log = logging.getLogger(__name__)
T = TypeVar("T")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Declares the bearer scheme in the OpenAPI document; check_auth decides (the key is optional).
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None,
                              Depends(HTTPBearer(auto_error=False))]

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
    app.add_middleware(BodySizeLimit, max_bytes=state.max_request_bytes)
    app.add_middleware(DrainMiddleware, gate=state.shutdown_gate)   # outermost: refuses first
    if state.replica is not None:
        app.add_middleware(ReplicaHeader, replica=state.replica)
    app.openapi = lambda: openapi_document(app, state)  # type: ignore[method-assign]

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
    async def check_auth(request: Request, _: BearerCredentials) -> None:
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

    # -------------------------------------------------------------- routes
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_auth)])

    @v1.get("/models", response_model=ModelList, responses=error_responses(401, 500, 503))
    async def list_models() -> JSONResponse:
        eng = state.ready_engine()
        max_model_len = eng.limits().max_model_len
        cards = [ModelCard(id=name, max_model_len=max_model_len) for name in state.model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    v1.include_router(completions_router(state, run_in_pool))
    v1.include_router(embeddings_router(state))
    app.include_router(v1)

    # ------------------------------------------------------ health, metrics
    @app.get("/health", response_model=HealthStatus,
             responses={503: {"model": HealthStatus, "description": "not serving: loading, "
                              "failed, engine_failed or shutting_down"}})
    async def health() -> JSONResponse:
        if state.shutdown_gate.draining:
            return JSONResponse({"status": "shutting_down"}, 503)
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

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition"},
                        503: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "the model is still loading"}})
    async def metrics() -> Response:
        eng = state.engine
        if eng is None:
            return Response("the model is still loading\n", 503, media_type="text/plain")
        return Response(eng.render_metrics(), media_type=METRICS_CONTENT_TYPE)

    return app
