"""The compiled suffix tree, when the optional ``arctic-jax-native`` package is installed.

``arctic_jax_native.SuffixTree`` (built from ``native/`` by ``pip install ./native``) is a C++ twin of
``suffix_tree.SuffixTree``: the same definitions and the same drafts (all five ``Draft`` fields; probs
bit-identical, score = this interpreter's ``sum(probs)``), at a fraction of the host cost. It differs
only at the edges:

- sequence ids are int64 integers (the Python tree takes any hashable; ``SuffixProposer`` uses ints),
  token ids int32; anything else is a ValueError;
- ``speculate`` returns the plain tuple ``(token_ids, parents, probs, score, match_len)`` (tuples,
  float, int): ``Draft(*result)`` builds the ``Draft``;
- it has no ``tokens_view`` or ``speculate_stored``; it keeps the other inspection methods
  (``seq_ids`` (ascending), ``seq_len``, ``seq_tail``, ``sequence``, ``count``, ``children``,
  ``best_child``, ``len``, ``in``, ``num_nodes``, ``num_tokens``, ``max_depth``) and adds ``sync``.

``SuffixProposer`` holds ``native_draft_tree_class(...)`` trees (the compiled tree whose
``speculate`` returns a ``Draft``, as the Python tree's does) and drives them with two calls that
keep per-token work out of Python:
``tree.sync(seq_id, head, tail, check)`` (bring a sequence up to ``head + tail`` when the stored one
is a prefix of it, checked on its last ``check`` tokens; -1 when not) and
``arctic_jax_native.speculate_pair(...)`` (a request's draft from its own tree and the global tree,
context read from the stored sequence, built straight into a ``Draft``).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from arctic_jax.speculative.suffix_tree import Draft


def native_suffix_tree_class() -> type | None:
    """``arctic_jax_native.SuffixTree`` when that package imports, else None (never raises ImportError)."""
    try:
        from arctic_jax_native import SuffixTree
    except ImportError:
        return None
    return SuffixTree


def native_speculate_pair() -> Callable | None:
    """``arctic_jax_native.speculate_pair`` when that package imports (and has it), else None."""
    try:
        from arctic_jax_native import speculate_pair
    except ImportError:
        return None
    return speculate_pair


@functools.cache
def native_draft_tree_class(base: type) -> type:
    """A subclass of the compiled tree class ``base`` whose ``speculate`` returns a ``Draft``."""

    class NativeSuffixTree(base):
        __doc__ = base.__doc__

        def speculate(self, context, max_spec_tokens: int, max_spec_factor: float = 1.0,
                      max_spec_offset: float = 0.0, min_token_prob: float = 0.1,
                      use_tree_spec: bool = False) -> Draft:
            """``SuffixTree.speculate``: the best ``Draft`` for the context."""
            return Draft(*base.speculate(self, context, max_spec_tokens, max_spec_factor,
                                         max_spec_offset, min_token_prob, use_tree_spec))

    return NativeSuffixTree
