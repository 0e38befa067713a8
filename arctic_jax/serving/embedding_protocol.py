"""Request and response bodies of POST /v1/embeddings (pydantic models, OpenAI's shape).

Parsed strictly like the other requests (``protocol.parse_request``): wrong types are errors,
unknown fields are rejected. Extensions beyond the OpenAI API: ``truncate_prompt_tokens`` and
``normalize`` (vLLM's), and ``prompt_name`` (a prompt of the model's sentence-transformers
config, prepended to each text).
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingRequest(BaseModel):
    """``input``: a text, a list of texts, one token-id list, or a list of token-id lists."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None   # None: "float"
    dimensions: int | None = None
    user: str | None = None                   # accepted, unused
    truncate_prompt_tokens: int | None = None  # extension: keep each input's last k tokens
    normalize: bool | None = None             # extension: None follows the model
    prompt_name: str | None = None            # extension: text inputs only


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
