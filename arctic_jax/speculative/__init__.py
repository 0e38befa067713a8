"""Speculative decoding: configuration, draft proposers, exact greedy verification, statistics.

Pure host-side Python and numpy; the engine and scheduler drive it.
"""
from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.factory import make_proposer
from arctic_jax.speculative.ngram import NgramProposer
from arctic_jax.speculative.proposer import Proposer, ProposerRequest
from arctic_jax.speculative.stats import SpeculationStats
from arctic_jax.speculative.verify import emitted_tokens, greedy_accept

__all__ = [
    "NgramProposer", "Proposer", "ProposerRequest", "SpeculationStats", "SpeculativeConfig",
    "emitted_tokens", "greedy_accept", "make_proposer",
]
