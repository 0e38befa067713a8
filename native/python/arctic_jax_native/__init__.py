"""Compiled helpers for arctic-jax.

``SuffixTree``: the suffix tree of ``arctic_jax.speculative.suffix_tree`` in C++ (same drafts),
with int64 sequence ids and int32 token ids; ``speculate`` returns the tuple
``(token_ids, parents, probs, score, match_len)``, the fields of ``suffix_tree.Draft`` in order.
``speculate_pair``: a request's draft from its per-request tree and the global tree in one call
(``SuffixProposer``'s speculation), built as a given ``Draft`` class.
"""
from arctic_jax_native._suffix_tree import SuffixTree, speculate_pair

__all__ = ["SuffixTree", "speculate_pair"]
