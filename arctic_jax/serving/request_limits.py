"""``BodySizeLimit``: ASGI middleware that answers 413 to a request body larger than
``--max-request-bytes`` before anything parses or tokenizes it.

A declared ``Content-Length`` above the limit is refused before the body is read; a body sent
without one (chunked) is counted as it arrives and refused once it passes the limit, so at most
the limit plus one chunk is ever held. Before answering, the rest of the body is read and
dropped (up to ``DISCARD_LIMIT`` bytes) so that a client still sending it gets the answer
instead of a reset connection; a client that sent ``Expect: 100-continue`` never sends it.
"""
from __future__ import annotations

from typing import Any

from arctic_jax.cli_args import DEFAULT_MAX_REQUEST_BYTES
from arctic_jax.serving.errors import APIError

# DEFAULT_MAX_REQUEST_BYTES, 8 MiB: a /v1/embeddings request of 2048 inputs (the default
# --max-embedding-inputs) of 512 token ids each is about 7 MB of JSON; a text prompt that fills
# a 128k-token context is under 1 MB. (Tokenizing 8 MiB of text takes seconds of one core.)
__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "DISCARD_LIMIT", "BodySizeLimit", "too_large"]
DISCARD_LIMIT = 64 << 20   # most bytes of a refused body read (and dropped) before answering


def too_large(limit: int, size: int | None) -> APIError:
    has = f"has {size} bytes, more than" if size is not None else "is larger than"
    return APIError(413, f"the request body {has} this server's limit of {limit} bytes "
                         "(--max-request-bytes)", code="request_too_large")


class BodySizeLimit:
    """Refuse HTTP request bodies larger than ``max_bytes`` with an OpenAI-style 413."""

    def __init__(self, app: Any, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = _content_length(headers)
        if declared is not None and declared > self.max_bytes:
            if headers.get(b"expect", b"").lower() != b"100-continue":
                await _discard(receive, DISCARD_LIMIT)
            await too_large(self.max_bytes, declared).response()(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await _discard(receive, DISCARD_LIMIT)
                    raise too_large(self.max_bytes, None)   # the app answers it (APIError)
            return message

        await self.app(scope, counted, send)


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    try:
        return int(headers[b"content-length"])
    except (KeyError, ValueError):
        return None


async def _discard(receive: Any, limit: int) -> None:
    """Read and drop what is left of the request body, at most ``limit`` bytes."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
