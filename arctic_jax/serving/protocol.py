"""Request and response bodies of the OpenAI-compatible API (pydantic models).

Requests are validated in strict JSON mode (``parse_request``): a field of the
wrong type is an error, never coerced ("0.5" is not a number), and unknown
fields are rejected. ``top_k``, ``min_p``, ``ignore_eos`` and
``stop_token_ids`` are extensions beyond the OpenAI API.
"""
from __future__ import annotations

import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ requests
class StreamOptions(_Strict):
    include_usage: bool | None = None


class _GenerationFields(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None            # extension
    min_p: float | None = None          # extension
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool | None = None      # extension
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_GenerationFields):
    """POST /v1/completions. ``prompt``: text, token ids, or a list of either (a batch)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class TextContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


RequestT = TypeVar("RequestT", bound=_Strict)


class RequestParseError(ValueError):
    """A request body that is not valid JSON or does not match the schema."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def _describe(errors: list[dict[str, Any]]) -> RequestParseError:
    first = errors[0]
    if first["type"] == "json_invalid":
        return RequestParseError(f"the request body is not valid JSON: {first['msg']}", None)
    loc = [str(x) for x in first["loc"]]
    if not loc:
        return RequestParseError(f"the request body must be a JSON object: {first['msg']}", None)
    param = loc[0]
    if first["type"] == "extra_forbidden":
        return RequestParseError(f"unrecognized request argument: {'.'.join(loc)}", param)
    if first["type"] == "missing":
        return RequestParseError(f"missing required argument: {'.'.join(loc)}", param)
    # Union members add their own entries; report every distinct reason for this field.
    # A union field fails once per member (their locations name the member types): report the
    # field and every distinct reason. Otherwise name the exact place, e.g. messages.0.role.
    same_field = [e for e in errors if e["loc"] and str(e["loc"][0]) == param]
    where = ".".join(loc) if len(same_field) == 1 else param
    reasons = list(dict.fromkeys(e["msg"] for e in same_field))
    got = first.get("input")
    shown = repr(got) if len(repr(got)) <= 80 else type(got).__name__
    return RequestParseError(f"invalid value for '{where}' ({shown}): {'; or '.join(reasons)}",
                             param)


def parse_request(model: type[RequestT], body: bytes) -> RequestT:
    """Validate a JSON body strictly; raises RequestParseError naming the bad field."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise _describe(e.errors()) from None


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
