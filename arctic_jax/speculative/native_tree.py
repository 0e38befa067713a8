"""The compiled suffix tree, when the optional ``arctic-jax-native`` package is installed.

``arctic_jax_native.SuffixTree`` (built from ``native/`` by ``pip install ./native``) is a C++ twin of
``suffix_tree.SuffixTree``: the same definitions and the same drafts (all five ``Draft`` fields; probs
bit-identical, score = this interpreter's ``sum(probs)``), at a fraction of the host cost. It differs
only at the edges:

- sequence ids are int64 integers (the Python tree takes any hashable; ``SuffixProposer`` uses ints),
  token ids int32; anything else is a ValueError;
- ``speculate`` returns the plain tuple ``(token_ids, parents, probs, score, match_len)`` (tuples,
  float, int): ``Draft(*result)`` builds the ``Draft``;
- it has no ``seq_ids()``; it keeps the other inspection methods (``seq_len``, ``seq_tail``,
  ``sequence``, ``count``, ``children``, ``best_child``, ``len``, ``in``, ``num_nodes``,
  ``num_tokens``, ``max_depth``).
"""
from __future__ import annotations

from arctic_jax.speculative.suffix_tree import Draft


def native_suffix_tree_class() -> type | None:
    """``arctic_jax_native.SuffixTree`` when that package imports, else None (never raises ImportError)."""
    try:
        from arctic_jax_native import SuffixTree
    except ImportError:
        return None
    return SuffixTree


class NativeSuffixTree:
    """The compiled tree behind the interface ``SuffixProposer`` drives (``extend``, ``remove``,
    ``tokens_view``, ``speculate_stored``, ``len``); other attributes reach the compiled tree.

    It mirrors each sequence's tokens in a Python list, which the proposer compares with the
    request's tokens to stay in sync (one list append per token)."""

    __slots__ = ("_tree", "_seqs")

    def __init__(self, max_depth: int) -> None:
        cls = native_suffix_tree_class()
        if cls is None:
            raise RuntimeError("arctic_jax_native is not installed (build it with `pip install ./native`)")
        self._tree = cls(max_depth)
        self._seqs: dict[int, list[int]] = {}

    def extend(self, seq_id: int, tokens) -> None:
        tokens = list(tokens)
        self._tree.extend(seq_id, tokens)
        self._seqs.setdefault(seq_id, []).extend(tokens)

    def remove(self, seq_id: int) -> None:
        self._tree.remove(seq_id)
        del self._seqs[seq_id]

    def tokens_view(self, seq_id: int) -> list[int]:
        """The stored token list of seq_id (read only; KeyError when absent)."""
        return self._seqs[seq_id]

    def speculate(self, context, max_spec_tokens: int, max_spec_factor: float = 1.0,
                  max_spec_offset: float = 0.0, min_token_prob: float = 0.1,
                  use_tree_spec: bool = False) -> Draft:
        """``SuffixTree.speculate``: the best ``Draft`` for the context."""
        return Draft(*self._tree.speculate(list(context), max_spec_tokens, max_spec_factor,
                                           max_spec_offset, min_token_prob, use_tree_spec))

    def seq_ids(self) -> list[int]:
        return list(self._seqs)

    def __len__(self) -> int:
        return len(self._tree)

    def __getattr__(self, name: str):
        return getattr(self._tree, name)

    def speculate_stored(self, tokens: list[int], n: int, seq_id, max_spec: int, factor: float,
                         offset: float, min_prob: float, use_tree: bool, floor: float) -> tuple | None:
        """``SuffixTree.speculate_stored``'s contract: the best draft for the context tokens[-n:]
        as (token_ids, parents, probs, score, match_len) when a suffix matches and its score
        beats ``floor``, else None (``seq_id`` is only a hint there and unused here)."""
        best = self._tree.speculate(tokens[len(tokens) - n:], max_spec, factor, offset, min_prob,
                                    use_tree)
        return best if best[4] > 0 and best[3] > floor else None
