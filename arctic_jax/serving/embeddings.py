"""POST /v1/embeddings (OpenAI-compatible) on an embedding model's ``AsyncEmbeddingEngine``.

``input``: a text, a list of texts, a token-id list or a list of token-id lists (at most
``ServerState.max_embedding_inputs``). Texts are tokenized in the ``EmbeddingTokenizer``'s
worker threads (one batched Rust encode per request); large bodies are parsed, validated and
rendered in worker threads too, so the event loop stays free. The engine coalesces concurrent
requests into device batches.

- ``encoding_format``: "float" (default) or "base64": each embedding's little-endian float32
  bytes in base64 (what the official openai client asks for by default).
- ``dimensions``: a Matryoshka width the model declares (its full width always works);
  truncated, then re-normalised when the model normalises.
- ``truncate_prompt_tokens`` (vLLM's): keep each input's last k tokens (-1: max_model_len);
  without it an input longer than max_model_len is a 400 naming it.
- ``normalize`` (vLLM's): true L2-normalises (on the host when the model does not); false is a
  400 for a model that normalises on the device (its raw vectors are never kept).
- ``prompt_name``: prepend that prompt of the model's ``config_sentence_transformers.json``
  to each text; without it the model's ``default_prompt_name`` applies, if any (as
  sentence-transformers' ``encode``). Token-id inputs take no prompt.
"""
from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from arctic_jax.engine.embedding_engine import truncate_embeddings
from arctic_jax.engine.embedding_front import AsyncEmbeddingEngine
from arctic_jax.engine.front import QueueFullError
from arctic_jax.serving.embedding_protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)
from arctic_jax.serving.errors import APIError, engine_error
from arctic_jax.serving.generations import until_disconnected
from arctic_jax.serving.openapi import error_responses, json_body
from arctic_jax.serving.protocol import RequestParseError, parse_request
from arctic_jax.serving.state import ServerState

T = TypeVar("T")
OFF_LOOP_BYTES = 1 << 16      # request bodies this large are parsed in a worker thread
OFF_LOOP_VALUES = 1 << 16     # responses with this many numbers are rendered in one


async def _call(off_loop: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in the loop's default worker pool when ``off_loop`` (large inputs)."""
    if not off_loop:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _parse(raw: bytes) -> EmbeddingRequest:
    try:
        return parse_request(EmbeddingRequest, raw)
    except RequestParseError as e:
        raise APIError(400, str(e), param=e.param) from None


def split_inputs(value: str | list) -> tuple[list, bool]:
    """(inputs, are_texts): the request's ``input`` as a list of texts or token-id lists."""
    if isinstance(value, str):
        return [value], True
    if not value:
        return [], False
    if isinstance(value[0], str):
        return value, True
    if isinstance(value[0], int):
        return [value], False
    return value, False


def base64_rows(emb: np.ndarray) -> list[str]:
    """Each row of ``emb`` [N, d] as base64 of its little-endian float32 bytes."""
    raw = np.ascontiguousarray(emb, dtype="<f4").tobytes()
    row_bytes = 4 * emb.shape[1]
    if row_bytes % 3 == 0:  # every row ends on a base64 group: encode all rows at once
        text = base64.b64encode(raw).decode("ascii")
        width = row_bytes // 3 * 4
        return [text[i:i + width] for i in range(0, len(text), width)]
    view = memoryview(raw)
    return [base64.b64encode(view[i:i + row_bytes]).decode("ascii")
            for i in range(0, len(raw), row_bytes)]


def render(emb: np.ndarray, encoding_format: str | None, model: str, request_id: str,
           num_tokens: int) -> bytes:
    """The JSON body of an ``EmbeddingResponse`` for embeddings [N, d] (built without
    re-validating the numbers)."""
    rows: Sequence[Any] = base64_rows(emb) if encoding_format == "base64" else emb.tolist()
    data = [EmbeddingData.model_construct(index=i, object="embedding", embedding=row)
            for i, row in enumerate(rows)]
    return EmbeddingResponse(
        id=request_id, model=model, data=data,
        usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
    ).model_dump_json().encode()


def _normalize_on_host(requested: bool | None, model_normalizes: bool) -> bool:
    """Whether the host must L2-normalise the engine's output for ``normalize=requested``."""
    if requested is False and model_normalizes:
        raise APIError(400, "normalize=false is not supported for this model: it L2-normalises "
                            "its embeddings on the device (a sentence-transformers Normalize "
                            "module); omit normalize", param="normalize", code="unsupported")
    return bool(requested) and not model_normalizes


def embeddings_router(state: ServerState) -> APIRouter:
    """The /embeddings route (mounted under /v1 with the app's auth) serving ``state``."""
    router = APIRouter()

    async def token_ids(body: EmbeddingRequest, inputs: list, are_texts: bool,
                        keep: int | None) -> list:
        if not are_texts:
            if body.prompt_name is not None:
                raise APIError(400, "prompt_name applies to text inputs only, not token ids",
                               param="prompt_name")
            return inputs
        tok = state.embedding_tokenizer
        try:
            tok.prompt(body.prompt_name)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt_name") from None
        if keep is not None:
            try:
                tok.text_room(keep, body.prompt_name)
            except ValueError as e:
                raise APIError(400, f"truncate_prompt_tokens={keep}: {e}",
                               param="truncate_prompt_tokens") from None
        try:
            return await tok.encode_async(inputs, prompt_name=body.prompt_name, keep=keep)
        except ValueError as e:
            raise APIError(400, str(e), param="input") from None

    @router.post("/embeddings", response_model=EmbeddingResponse, openapi_extra=json_body(
        EmbeddingRequest), responses=error_responses(400, 401, 413, 429, 500, 503))
    async def embeddings(request: Request) -> Response:
        front: AsyncEmbeddingEngine = state.require("embed", "/v1/embeddings")
        raw = await request.body()
        body = await _call(len(raw) > OFF_LOOP_BYTES, _parse, raw)
        state.check_model(body.model)
        inputs, are_texts = split_inputs(body.input)
        if not inputs:
            raise APIError(400, "input is empty: send a text, a list of texts, a token-id list "
                                "or a list of token-id lists", param="input")
        limit = state.max_embedding_inputs
        if len(inputs) > limit:
            raise APIError(400, f"too many inputs: {len(inputs)}; this server takes at most "
                                f"{limit} per request (--max-embedding-inputs)", param="input")
        engine = front.engine
        try:
            dims = engine.check_dimensions(body.dimensions)
        except ValueError as e:
            raise APIError(400, str(e), param="dimensions") from None
        try:
            keep = engine.check_truncation(body.truncate_prompt_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="truncate_prompt_tokens") from None
        host_normalize = _normalize_on_host(body.normalize, engine.pooling.normalize)

        ids = await token_ids(body, inputs, are_texts, keep)
        lengths = [len(seq) for seq in ids]
        max_len = front.limits().max_model_len
        if keep is None and max(lengths) > max_len:
            i = next(i for i, n in enumerate(lengths) if n > max_len)
            raise APIError(400, f"input {i} has {lengths[i]} tokens, more than this model's "
                                f"maximum of {max_len} (max_model_len); shorten it or pass "
                                f"truncate_prompt_tokens", param="input",
                           code="context_length_exceeded")
        try:
            seqs, dims = await _call(sum(lengths) > OFF_LOOP_VALUES, front.validate, ids, dims,
                                     keep)
        except ValueError as e:  # empty inputs, token ids outside the vocabulary
            raise APIError(400, str(e), param="input") from None
        num_tokens = sum(len(seq) for seq in seqs)
        try:
            emb = await until_disconnected(request, front.submit(seqs, dims),
                                           state.shutdown_gate)
        except (QueueFullError, ValueError, RuntimeError) as e:
            raise engine_error(e) from None
        if host_normalize:
            emb = truncate_embeddings(emb, emb.shape[1], True)
        content = await _call(emb.size > OFF_LOOP_VALUES, render, emb, body.encoding_format,
                              state.served_model_name, f"embd-{uuid.uuid4().hex}", num_tokens)
        return Response(content, media_type="application/json")

    return router
