"""Request and response bodies of POST /v1/embeddings (pydantic models, OpenAI's shape).

Parsed strictly like the other requests (``protocol.parse_request``): wrong types are errors,
unknown fields are rejected; integers are JSON Schema's (2.0 is one). Extensions beyond the
OpenAI API: ``truncate_prompt_tokens`` and ``normalize`` (vLLM's), and ``prompt_name`` (a
prompt of the model's sentence-transformers config, prepended to each text).
"""
from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field, WithJsonSchema

from arctic_jax.serving.schemas import StrictModel, json_int_checked_by_route

# Emptiness, token ids and widths are checked by the route (its messages name the input); the
# schema states the same rules.
_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_TEXT = {"type": "string", "minLength": 1}
INPUT_SCHEMA = {"anyOf": [_TEXT, {"type": "array", "minItems": 1, "items": _TEXT}, _IDS,
                          {"type": "array", "minItems": 1, "items": _IDS}],
                "description": "a text, a list of texts, a token-id list or a list of token-id "
                               "lists (at most the server's --max-embedding-inputs)"}
TokenId = json_int_checked_by_route(minimum=0)
Dimensions = json_int_checked_by_route(minimum=1)
TruncateTokens = json_int_checked_by_route(minimum=-1, **{"not": {"const": 0}})


class EmbeddingRequest(StrictModel):
    """``input``: a text, a list of texts, one token-id list, or a list of token-id lists."""

    model: str
    input: Annotated[str | list[str] | list[TokenId] | list[list[TokenId]],
                     WithJsonSchema(INPUT_SCHEMA)]
    encoding_format: Literal["float", "base64"] | None = None   # None: "float"
    dimensions: Dimensions | None = Field(
        None, description="a Matryoshka width the model declares, or its full width")
    user: str | None = None                   # accepted, unused
    truncate_prompt_tokens: TruncateTokens | None = Field(
        None, description="vLLM: keep each input's last k tokens (-1: max_model_len); a text "
                          "input needs room for its special tokens and prompt besides")
    normalize: bool | None = Field(None, description="vLLM: None follows the model")
    prompt_name: str | None = Field(None, description="a prompt of the model's "
                                                      "sentence-transformers config (text inputs "
                                                      "only)")


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str              # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


def _now() -> int:
    return int(time.time())


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=_now)
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage
