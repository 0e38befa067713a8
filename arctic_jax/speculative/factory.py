"""Building the proposer a ``SpeculativeConfig`` names."""
from __future__ import annotations

from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.ngram import NgramProposer
from arctic_jax.speculative.proposer import Proposer
from arctic_jax.speculative.suffix_proposer import SuffixProposer


def make_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer ``config.method`` names ("ngram" or "suffix"; the config refuses others)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "suffix":
        return SuffixProposer(max_depth=config.suffix_cache_max_depth,
                              max_cached_requests=config.suffix_cache_max_requests,
                              max_spec_factor=config.suffix_max_spec_factor,
                              max_spec_offset=config.suffix_max_spec_offset,
                              min_token_prob=config.suffix_min_token_prob,
                              use_tree_spec=config.suffix_use_tree_spec)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
