"""Response bodies of the OpenAI-compatible API (pydantic models), and ``parse_request``, which
validates a request body against its model (``schemas.py``, ``embedding_protocol.py``).

Requests are validated in strict JSON mode: a field of the wrong type is an error, never
coerced ("0.5" is not a number), and unknown fields are rejected. Every failure becomes one
``RequestParseError`` naming the parameter.
"""
from __future__ import annotations

import re
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, model_serializer

RequestT = TypeVar("RequestT", bound=BaseModel)


class RequestParseError(ValueError):
    """A request body that is not valid JSON or does not match the schema."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


_ESCAPE = re.compile(rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
_JSON_ESCAPES = '\\" \\\\ \\/ \\b \\f \\n \\r \\t and \\uXXXX'


def lone_surrogate(body: bytes) -> str | None:
    """Where ``body`` holds a \\uXXXX escape that is half of a UTF-16 surrogate pair without
    its other half (JSON text must be valid Unicode), e.g. "\\ud800 at byte 12"; else None."""
    high: tuple[int, str] | None = None   # a high half waiting for its low half: (end, where)
    for m in _ESCAPE.finditer(body):
        if len(m.group(1)) % 2 == 0:       # an escaped backslash, then plain text
            continue
        at = m.end(1) - 1
        where = f"\\u{m.group(2).decode()} at byte {at}"
        adjacent = high is not None and len(m.group(1)) == 1 and m.start() == high[0]
        if int(m.group(2), 16) >= 0xDC00:  # a low half
            if not adjacent:
                return where if high is None else high[1]
            high = None
        elif high is not None:
            return high[1]
        else:
            high = (m.end(), where)
    return high[1] if high is not None else None


def _json_error(message: str, body: bytes) -> RequestParseError:
    message = message.removeprefix("Invalid JSON: ")
    if "escape" in message or "surrogate" in message:
        half = lone_surrogate(body)
        if half is not None:
            message = (f"{half} is half of a UTF-16 surrogate pair: a \\uD800-\\uDBFF escape "
                       "must be followed by a \\uDC00-\\uDFFF one")
        elif "invalid escape" in message:
            message = f"{message} (JSON's escapes are {_JSON_ESCAPES})"
    return RequestParseError(f"the request body is not valid JSON: {message}", None)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def _path(loc: tuple[Any, ...]) -> list[str]:
    """A field's location without pydantic's union-member labels (e.g. "list[str]", "str")."""
    return [str(x) for x in loc if not isinstance(x, str)
            or (re.fullmatch(r"[a-z_][a-z0-9_]*|[0-9]+", x) and x not in _TYPE_NAMES)]


def _describe(errors: list[dict[str, Any]], body: bytes) -> RequestParseError:
    first = errors[0]
    if first["type"] == "json_invalid":
        return _json_error(first["msg"], body)
    loc = [str(x) for x in first["loc"]]
    if not loc:
        return RequestParseError(f"the request body must be a JSON object: {first['msg']}", None)
    param = loc[0]
    if first["type"] == "extra_forbidden":
        return RequestParseError(f"unrecognized request argument: {'.'.join(loc)}", param)
    if first["type"] == "missing":
        return RequestParseError(f"missing required argument: {'.'.join(loc)}", param)
    # A union field fails once per member type. Where the value has a member's type but breaks
    # its limits (a too long list, a number out of range), report those reasons only, else every
    # distinct reason. One reason names its exact place (e.g. messages.0.role), more the field.
    same_field = [e for e in errors if e["loc"] and str(e["loc"][0]) == param]
    chosen = [e for e in same_field if not e["type"].endswith("_type")] or same_field
    where = ".".join(_path(chosen[0]["loc"])) if len(chosen) == 1 else param
    reasons = list(dict.fromkeys(e["msg"] for e in chosen))
    got = chosen[0].get("input")
    shown = repr(got) if len(repr(got)) <= 80 else type(got).__name__
    return RequestParseError(f"invalid value for '{where}' ({shown}): {'; or '.join(reasons)}",
                             param)


def parse_request(model: type[RequestT], body: bytes) -> RequestT:
    """Validate a JSON body strictly; raises RequestParseError naming the bad field."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise _describe(e.errors(), body) from None


# ----------------------------------------------------------------- responses
def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions format: one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (``stream``) one chunk of it; both use this shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    """Sends only the fields that are set."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "arctic-jax"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthStatus(BaseModel):
    """GET /health: 200 "ok" or "degraded" (a data-parallel replica failed, the others serve);
    503 "loading", "failed" (start-up), "engine_failed" or "shutting_down"."""

    status: Literal["ok", "degraded", "loading", "failed", "engine_failed", "shutting_down"]
    error: str | None = None
    failed_replicas: list[int] | None = None
