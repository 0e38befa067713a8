"""Speculative decoding: configuration, draft proposers (n-gram, suffix trees), exact greedy
verification, rejection-sampling verification rows, statistics.

Host-side Python and numpy, driven by the engine and scheduler; ``rejection.py`` holds the
jit-compatible rejection-sampling verification of sampled rows (not yet wired into the engine).
"""
from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.factory import make_proposer
from arctic_jax.speculative.ngram import NgramProposer
from arctic_jax.speculative.proposer import Proposer, ProposerRequest
from arctic_jax.speculative.stats import SpeculationStats
from arctic_jax.speculative.suffix_proposer import SuffixProposer
from arctic_jax.speculative.suffix_tree import Draft, SuffixTree
from arctic_jax.speculative.verify import emitted_tokens, greedy_accept

__all__ = [
    "Draft", "NgramProposer", "Proposer", "ProposerRequest", "SpeculationStats", "SpeculativeConfig",
    "SuffixProposer", "SuffixTree", "emitted_tokens", "greedy_accept", "make_proposer",
]
