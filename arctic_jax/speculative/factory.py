"""Building the proposer a ``SpeculativeConfig`` names."""
from __future__ import annotations

from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.ngram import NgramProposer
from arctic_jax.speculative.proposer import Proposer


def make_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer ``config.method`` names (only "ngram" today; the config refuses others)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    raise ValueError(f"no proposer for speculative method {config.method!r}")
