"""Request bodies of POST /v1/completions and /v1/chat/completions: the typed contract.

pydantic models with OpenAI's field names, types and ranges (plus vLLM's extra sampling fields
``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``). The routes
validate bodies with these models (``protocol.parse_request``, strict JSON mode) and the
OpenAPI document is generated from them, so the two agree by construction. What a JSON schema
of one body cannot express is checked by the routes and declared here as JSON-schema rules:
``stream_options`` needs ``stream: true``; chat's ``top_logprobs`` needs ``logprobs: true``
(OpenAI's and vLLM's rule). Limits that depend on the served model (its name, context length,
vocabulary, ``--max-logprobs``) are added to the served document (``openapi.py``).

Parameters declared with OpenAI's range but accepted today only at their neutral value are
listed in ``unsupported.py``.

Integers follow JSON Schema: a number with an integral value (``"seed": 0.0``) is an integer;
``0.5``, ``"1"`` and ``true`` are not.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from arctic_jax.sampling import MAX_LOGPROBS, MAX_SEED

MAX_STOP_SEQUENCES = 16
"""Most stop strings one request may send. OpenAI takes 4 and vLLM any number; every stop
string is searched in the new text of every generated token on the engine's host thread, so the
number is bounded. 16 covers OpenAI's 4 and the stop lists evaluation harnesses send."""
MAX_CHOICES = 16          # OpenAI's n goes to 128; the engine's copies share one KV cache
MAX_TOP_K = 2**31 - 1     # the sampler's int32; any top_k above the vocabulary keeps every token
MAX_LOGIT_BIAS = 100.0    # OpenAI's range of a logit_bias value: [-100, 100]
MAX_PENALTY = 2.0         # OpenAI's range of presence and frequency penalties: [-2, 2]


def _integral(value: Any) -> Any:
    """A float with an integral value is a JSON integer; anything else is left to int's check."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def json_int(**constraints: Any) -> Any:
    """int in JSON Schema's sense (2.0 is an integer), with pydantic ``Field`` constraints."""
    return Annotated[int, Field(**constraints), BeforeValidator(_integral)]


def json_int_checked_by_route(**keywords: Any) -> Any:
    """A JSON integer whose limits (JSON-schema ``keywords``, e.g. minimum=1) the route checks
    with its own messages; the schema states them."""
    return Annotated[int, BeforeValidator(_integral), WithJsonSchema({"type": "integer",
                                                                     **keywords})]


TokenId = json_int(ge=0)
PositiveInt = json_int(ge=1)
TopK = json_int(ge=-1, le=MAX_TOP_K)
Choices = json_int(ge=1, le=MAX_CHOICES)
Seed = json_int(ge=0, le=MAX_SEED)
NumLogprobs = json_int(ge=0, le=MAX_LOGPROBS)
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
NonEmptyText = Annotated[str, Field(min_length=1)]
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]+$")],
         Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
    WithJsonSchema({"type": "object", "propertyNames": {"pattern": "^[0-9]+$"},
                    "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                             "maximum": MAX_LOGIT_BIAS}}),
]


def _requires(field: str, field_type: str, other: str, value: Any) -> dict[str, Any]:
    """JSON-schema rule: when ``field`` is sent (not null), ``other`` must be ``value``."""
    return {"if": {"required": [field], "properties": {field: {"type": field_type}}},
            "then": {"required": [other], "properties": {other: {"const": value}}}}


STREAM_OPTIONS_RULE = _requires("stream_options", "object", "stream", True)
TOP_LOGPROBS_RULE = _requires("top_logprobs", "integer", "logprobs", True)


class StrictModel(BaseModel):
    """Unknown fields are errors; NaN and infinities are not numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(StrictModel):
    include_usage: bool | None = Field(None, description="send a last chunk with `usage`")


class GenerationFields(StrictModel):
    """Fields shared by completions and chat completions."""

    model: str = Field(description="a name the server answers to (GET /v1/models)")
    max_tokens: PositiveInt | None = Field(
        None, description="most tokens to generate; prompt plus these must fit the context "
                          "(completions default 16, chat: the room left)")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
        None, description="0 is greedy (default 1)")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(None, description="nucleus mass")
    top_k: TopK | None = Field(
        None, description="vLLM: keep the k most likely tokens; 0 or -1 keeps all")
    min_p: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None, description="vLLM: drop tokens below min_p times the top probability")
    n: Choices | None = Field(None, description="choices per prompt")
    stream: bool | None = Field(None, description="stream chunks as server-sent events")
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    stop: NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP_SEQUENCES)] \
        | None = Field(None, description=f"up to {MAX_STOP_SEQUENCES} strings that end the "
                                         "output (not included in it)")
    stop_token_ids: list[TokenId] | None = Field(None, description="vLLM: tokens that end the "
                                                                   "output")
    ignore_eos: bool | None = Field(None, description="vLLM: keep going past end-of-sequence")
    seed: Seed | None = Field(
        None, description="makes sampling reproducible (whatever else shares the batch)")
    presence_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = Field(
        None, description="vLLM: > 1 discourages tokens of the prompt and output")
    logit_bias: LogitBias | None = Field(
        None, description="token id (a string) -> bias in [-100, 100] added to its logit")
    user: str | None = Field(None, description="accepted, unused")


class CompletionRequest(GenerationFields):
    """POST /v1/completions. ``prompt``: text, token ids, or a list of either (a batch)."""

    model_config = ConfigDict(json_schema_extra={"allOf": [STREAM_OPTIONS_RULE]})

    prompt: (NonEmptyText | TokenIds | Annotated[list[NonEmptyText], Field(min_length=1)]
             | Annotated[list[TokenIds], Field(min_length=1)]) = Field(
        description="a text, a token-id list, or a list of either (one choice each)")
    logprobs: NumLogprobs | None = Field(
        None, description="top logprobs per generated token (at most the server's "
                          "--max-logprobs)")
    echo: bool | None = None
    suffix: str | None = None
    best_of: PositiveInt | None = Field(None, description="not supported; use n")


class TextContentPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra={"allOf": [STREAM_OPTIONS_RULE,
                                                           TOP_LOGPROBS_RULE]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = Field(
        None, description="max_tokens under its newer name (wins when both are sent)")
    logprobs: bool | None = Field(None, description="return the chosen tokens' logprobs")
    top_logprobs: NumLogprobs | None = Field(
        None, description="top logprobs per token (needs logprobs: true; at most the server's "
                          "--max-logprobs)")


REQUEST_MODELS: tuple[type[StrictModel], ...] = (CompletionRequest, ChatCompletionRequest)
