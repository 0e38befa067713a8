"""Building the proposer a ``SpeculativeConfig`` names, and reading its draft model."""
from __future__ import annotations

from typing import Any

from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.ngram import NgramProposer
from arctic_jax.speculative.proposer import Proposer
from arctic_jax.speculative.suffix_proposer import SuffixProposer


def make_proposer(config: SpeculativeConfig) -> Proposer | None:
    """The host proposer ``config`` needs: n-gram, suffix (also a draft model's suffix
    decoding), or None for a draft model alone (its drafts come from the device)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.uses_draft_model and not config.enable_suffix_decoding:
        return None
    if config.uses_suffix:
        return SuffixProposer(max_depth=config.suffix_cache_max_depth,
                              max_cached_requests=config.suffix_cache_max_requests,
                              max_spec_factor=config.suffix_max_spec_factor,
                              max_spec_offset=config.suffix_max_spec_offset,
                              min_token_prob=config.suffix_min_token_prob,
                              use_tree_spec=bool(config.suffix_use_tree_spec))
    raise ValueError(f"no proposer for speculative method {config.method!r}")


def load_checked_draft_model(path: str, base: Any, dtype: Any = None) -> tuple[Any, Any]:
    """(``DraftModelConfig``, weights) of the draft checkpoint at ``path``, checked against the
    base model's config ``base`` (hidden size, vocabulary); ValueError naming both values."""
    from arctic_jax.speculative.draft_checkpoint import check_base_model, load_draft_model

    cfg, weights = load_draft_model(path, dtype=dtype)
    check_base_model(cfg, base.hidden_size, base.vocab_size)
    return cfg, weights
