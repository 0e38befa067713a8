"""The ``Proposer`` protocol the scheduler drives, and the factory for configured proposers.

Per step the engine calls ``propose`` for the requests that will speculate, then
``on_tokens`` with each request's newly accepted tokens once verified, and
``on_finish`` when a request finishes or is aborted.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.ngram import NgramProposer


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


def make_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer ``config.method`` names (only "ngram" today; the config refuses others)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
