"""What the server and the bench drive: an ``EngineFront`` and the ``EngineLimits`` it enforces.

``AsyncEngine`` (one engine thread) and ``ReplicaRouter`` (data-parallel replicas) implement
``EngineFront``; callers above the engine package use only this protocol, never the engine's
scheduler, config or model config.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from arctic_jax.engine.request import RequestOutput
from arctic_jax.sampling import SamplingParams


class QueueFullError(RuntimeError):
    """Too many requests are in flight; retry later."""


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    """The fixed request limits of an engine (the same on every data-parallel replica).

    vocab_size: prompt token ids must lie in [0, vocab_size).
    max_model_len: prompt plus output tokens of one request.
    max_logprobs: most top logprobs a request may ask for.
    max_num_seqs: most requests the engine runs at once (more wait in its queue).
    """

    vocab_size: int
    max_model_len: int
    max_logprobs: int
    max_num_seqs: int

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_model_len", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")


@runtime_checkable
class EngineFront(Protocol):
    """A running engine as its asyncio clients see it. Every method may be called from the
    clients' event loop thread; ``generate`` streams, the rest return at once."""

    def limits(self) -> EngineLimits:
        """The engine's request limits (fixed for its lifetime)."""
        ...

    def validate_prompt(self, prompt_ids: Sequence[int]) -> None:
        """Raise ValueError for a prompt that can never run (empty, too long, bad token ids)."""
        ...

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; leaving early aborts it. Raises ValueError (bad
        request), ``QueueFullError`` (too many in flight) or RuntimeError (engine failure)."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request in flight and free its pages (no-op for an unknown id)."""
        ...

    def num_requests(self) -> int:
        """Requests in flight."""
        ...

    def render_metrics(self) -> bytes:
        """Prometheus text exposition of the engine's metrics."""
        ...

    @property
    def alive(self) -> bool:
        """Whether requests can still be served."""
        ...

    @property
    def error(self) -> BaseException | None:
        """The failure that stopped the engine (or a replica of it); None while all run."""
        ...

    @property
    def failed_replicas(self) -> list[int]:
        """Indices of failed data-parallel replicas while others still serve (else empty)."""
        ...

    def start(self) -> None:
        """Start the engine thread(s)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine thread(s)."""
        ...
