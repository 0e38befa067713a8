"""The ``Proposer`` protocol the engine drives (``factory.make_proposer`` builds configured ones).

Per step the engine calls ``propose`` for the requests that will speculate, then
``on_tokens`` with each request's newly accepted tokens once verified, and
``on_finish`` when a request finishes or is aborted.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class ProposerRequest(Protocol):
    """What a proposer reads from a request (the engine's ``Request`` has these)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]


@runtime_checkable
class Proposer(Protocol):
    """Drafts tokens for requests from their known context."""

    def propose(self, requests: Sequence[ProposerRequest], k: int) -> list[list[int]]:
        """One draft per request, each a list of 0..k token ids, in the order given."""
        ...

    def on_tokens(self, request: ProposerRequest, new_tokens: Sequence[int]) -> None:
        """The request accepted ``new_tokens`` (appended to its output)."""
        ...

    def on_finish(self, request: ProposerRequest) -> None:
        """The request left the engine; drop any state held for it."""
        ...
