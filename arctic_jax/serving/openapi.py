"""The OpenAPI document of the server: the contract clients and fuzzers read.

The routes read and validate their raw bodies themselves (one OpenAI-style 400 per bad body), so
FastAPI does not see the request models; ``generation_route_docs`` and ``json_body`` attach them
(``openapi_extra``), and ``openapi_document`` puts their JSON schemas in ``components``. Every
route documents its error responses with the OpenAI error body.

The served document also states what the running server accepts: its model's task's routes
only, the model names it answers to, its context length, vocabulary and ``--max-logprobs``,
``--max-embedding-inputs``, and the parameters ``unsupported.py`` narrows to their neutral
value. Until the model is loaded the
document lacks the model's limits (and is rebuilt on the next request).
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from arctic_jax.serving.embedding_protocol import EmbeddingRequest
from arctic_jax.serving.protocol import ChatCompletionChunk, ErrorResponse
from arctic_jax.serving.schemas import REQUEST_MODELS
from arctic_jax.serving.unsupported import narrow_schema

REF = "#/components/schemas/{model}"
ERROR_DESCRIPTIONS = {
    400: "Invalid request: the message names the parameter (`param`). Two limits depend on the "
         "prompt's tokens, so no schema states them: a prompt longer than the model's context "
         "(`code` context_length_exceeded) and a text with no tokens (`code` empty_prompt)",
    401: "Missing or wrong API key (servers started with --api-key)",
    413: "Request body larger than --max-request-bytes",
    429: "Too many requests in flight (--max-queue); retry after `Retry-After` seconds",
    500: "Engine failure",
    503: "Model still loading, or the server is shutting down (with `Retry-After`)",
}
OTHER_TASK_PATHS = {"generate": ("/v1/embeddings",),
                    "embed": ("/v1/completions", "/v1/chat/completions")}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for these error statuses, each with the OpenAI error body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER
    return out


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring a required JSON request body of ``model``."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": REF.format(model=model.__name__)}}}}}


def sse_event_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """The schema of one server-sent event of a ``stream: true`` response (an Open API 3.1
    text/event-stream ``schema`` describes each event: its fields ``data``, ``event``, ``id``,
    ``retry``): ``data`` is a ``chunk`` JSON object, an error body (the request failed after
    the stream began), or the last event's ``[DONE]``."""
    payload = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": REF.format(model=chunk.__name__)}, {"$ref": REF.format(model="ErrorResponse")}]}}
    return {"type": "object", "required": ["data"], "description": (
        f"stream: true: server-sent events, each `data: ` line a {chunk.__name__} JSON object "
        "(or an error body if the request fails after the stream began), then `data: [DONE]`"),
        "properties": {"data": {"type": "string", "if": {"const": "[DONE]"}, "else": payload},
                       "event": {"const": "message"}}}


def generation_route_docs(request: type[BaseModel], response: type[BaseModel],
                          chunk: type[BaseModel]) -> dict[str, Any]:
    """Decorator arguments documenting a generation route: its body, its JSON response, its
    SSE stream of ``chunk`` objects (``stream: true``), and its errors."""
    stream = {"schema": sse_event_schema(chunk),
              "x-sse-data": {"$ref": REF.format(model=chunk.__name__)}}
    responses: dict[int | str, dict[str, Any]] = {
        200: {"content": {"text/event-stream": stream},
              "description": f"{response.__name__}, or a stream of {chunk.__name__} objects"}}
    responses.update(error_responses(400, 401, 413, 429, 500, 503))
    return {"response_model": response, "responses": responses,
            "openapi_extra": json_body(request)}


REQUEST_NAMES = {m.__name__ for m in (*REQUEST_MODELS, EmbeddingRequest)}


def _body_schemas() -> dict[str, Any]:
    """JSON schemas of the request models and of the streamed chunks (and of the models they
    use), by name: those FastAPI does not see. (The chunks' in validation mode: a chunk's delta
    sends only the fields that are set.)"""
    models = (*REQUEST_MODELS, EmbeddingRequest, ChatCompletionChunk)
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    return top["$defs"]


def _integers(schema: Any) -> Iterator[dict[str, Any]]:
    """Every integer schema nested in ``schema``."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            yield schema
        for value in schema.values():
            yield from _integers(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _integers(value)


def _non_null(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]


def decimal_below_pattern(limit: int) -> str:
    """A regular expression matching the decimal integers in [0, ``limit``) and nothing else
    (leading zeros allowed, as ``int()`` reads them): JSON object keys that are token ids."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")

    def digits(low: int, high: int) -> str:
        return str(low) if low == high else f"[{low}-{high}]"

    def repeat(atom: str, low: int, high: int) -> str:
        if high == 0:
            return ""
        return atom + ("" if low == high == 1 else f"{{{low}}}" if low == high else f"{{{low},{high}}}")

    top = str(limit - 1)
    forms = ["0"]
    if len(top) > 1:   # fewer digits than the largest
        forms.append("[1-9]" + repeat("[0-9]", 0, len(top) - 2))
    for i, digit in enumerate(top):   # as many digits: a prefix of ``top``, then a smaller digit
        low = 1 if i == 0 else 0
        if int(digit) > low:
            rest = len(top) - i - 1
            forms.append(top[:i] + digits(low, int(digit) - 1) + repeat("[0-9]", rest, rest))
    if top != "0":
        forms.append(top)
    return "^0*(?:" + "|".join(forms) + ")$"


def _served_limits(schemas: dict[str, Any], state: Any) -> None:
    """State the running server's limits in the request schemas (in place)."""
    names = [*state.model_names, *state.model_aliases]
    for name in ("CompletionRequest", "ChatCompletionRequest", "EmbeddingRequest"):
        schemas[name]["properties"]["model"]["enum"] = names
    if state.task == "embed":
        _embedding_limits(schemas["EmbeddingRequest"]["properties"], state)
        return
    limits = state.engine.limits()
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            for branch in _non_null(props.get(field, {})):
                branch["maximum"] = limits.max_model_len - 1
        for field in ("logprobs", "top_logprobs"):
            for branch in _non_null(props.get(field, {})):
                if branch.get("type") == "integer":
                    branch["maximum"] = limits.max_logprobs
        for branch in _non_null(props["logit_bias"]):   # token ids of the vocabulary
            branch["propertyNames"] = {"pattern": decimal_below_pattern(limits.vocab_size)}
    for token in _integers(schemas["CompletionRequest"]["properties"]["prompt"]):
        token["maximum"] = limits.vocab_size - 1


def _embedding_limits(props: dict[str, Any], state: Any) -> None:
    inputs = props["input"]["anyOf"]
    for branch in (inputs[1], inputs[3]):      # lists of texts / of token-id lists
        branch["maxItems"] = state.max_embedding_inputs
    engine = state.engine.engine
    pooling = engine.pooling
    _non_null(props["dimensions"])[0]["enum"] = sorted({*pooling.matryoshka_dimensions,
                                                        engine.hidden_size})
    _non_null(props["truncate_prompt_tokens"])[0]["maximum"] = state.engine.limits().max_model_len
    _non_null(props["prompt_name"])[0]["enum"] = list(pooling.prompts)
    if pooling.normalize:
        _non_null(props["normalize"])[0]["const"] = True


def openapi_document(app: FastAPI, state: Any) -> dict[str, Any]:
    """``app.openapi``: FastAPI's document with the request schemas, the security scheme and
    the served limits; cached once the model is ready."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible API of arctic-jax. Errors are "
                                  "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.")
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    requests = copy.deepcopy(_body_schemas())
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        narrow_schema(name, requests[name])
    ready = state.engine is not None
    if ready:
        _served_limits(requests, state)
        for path in OTHER_TASK_PATHS[state.task]:   # a model serves its task's routes only
            doc["paths"].pop(path, None)
    for name, schema in requests.items():
        if name in components:   # a response model a chunk uses too: keep FastAPI's
            if name in REQUEST_NAMES:
                raise RuntimeError(f"a request and a response model are both named {name}")
            continue
        components[name] = schema
    schemes = doc["components"].get("securitySchemes", {})
    for scheme in schemes.values():
        scheme["description"] = ("'Authorization: Bearer <key>' on /v1/*; required when the "
                                 "server runs with --api-key, ignored otherwise")
    if ready:
        app.openapi_schema = doc
    return doc
