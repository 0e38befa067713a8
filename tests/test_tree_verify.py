"""Draft-tree verification helpers (``speculative.verify``) against brute-force oracles on random
trees: the accepted path, the depth-first re-ordering, and the chain prefix whose KV stays."""
from __future__ import annotations

import numpy as np
import pytest

from arctic_jax.speculative.verify import chain_prefix, greedy_accept, preorder, tree_accept, tree_depth


def _random_tree(rng, n, vocab):
    """n drafts with random parents; siblings carry distinct tokens (as a suffix tree's do)."""
    drafts, parents, used = [], [], {}
    for i in range(n):
        p = int(rng.integers(-1, i))
        free = [t for t in range(vocab) if t not in used.get(p, set())]
        if not free:
            break
        t = int(rng.choice(free))
        used.setdefault(p, set()).add(t)
        drafts.append(t)
        parents.append(p)
    return drafts, parents


def _root_paths(parents):
    """Every path from the root as a list of draft indices (the empty path included)."""
    paths = [[]]
    for i, p in enumerate(parents):
        paths.extend(path + [i] for path in list(paths) if (path[-1] if path else -1) == p)
    return paths


def _oracle_accept(drafts, parents, rows):
    """The longest root path along which each draft equals the token of its parent's row (row 0:
    the root; draft i's row: i + 1). With distinct sibling tokens it is unique."""
    def valid(path):
        return all(drafts[b] == rows[0 if a < 0 else a + 1]
                   for a, b in zip([-1] + path, path, strict=False))
    paths = [p for p in _root_paths(parents) if valid(p)]
    longest = max(len(p) for p in paths)
    (best,) = [p for p in paths if len(p) == longest]
    return best


@pytest.mark.parametrize("seed", range(40))
def test_tree_accept_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    vocab = 3   # small: many matches
    drafts, parents = _random_tree(rng, int(rng.integers(1, 12)), vocab)
    rows = [int(t) for t in rng.integers(0, vocab, len(drafts) + 1)]
    path = tree_accept(drafts, parents, rows)
    assert path == _oracle_accept(drafts, parents, rows)
    for a, b in zip([-1] + path, path, strict=False):
        assert parents[b] == a
    # a chain is a path draft: the tree walk agrees with greedy_accept
    chain = list(range(-1, len(drafts) - 1))
    assert len(tree_accept(drafts, chain, rows)) == greedy_accept(drafts, rows)


@pytest.mark.parametrize("seed", range(20))
def test_preorder_keeps_the_tree_and_puts_the_first_chain_first(seed):
    rng = np.random.default_rng(100 + seed)
    drafts, parents = _random_tree(rng, int(rng.integers(1, 16)), 50)
    new_drafts, new_parents = preorder(drafts, parents)
    assert all(-1 <= p < i for i, p in enumerate(new_parents))

    def paths_as_tokens(d, p):
        return sorted(tuple(d[i] for i in path) for path in _root_paths(p))
    assert paths_as_tokens(new_drafts, new_parents) == paths_as_tokens(drafts, parents)
    # the chain of first-drafted children comes first, in order
    chain, node = [], -1
    while (kids := [i for i, p in enumerate(parents) if p == node]):
        node = kids[0]
        chain.append(drafts[node])
    assert new_drafts[:len(chain)] == chain
    assert new_parents[:len(chain)] == list(range(-1, len(chain) - 1))


def test_chain_prefix_and_bad_input():
    assert chain_prefix([0, 1, 2]) == 3 and chain_prefix([0, 2, 3]) == 1 and chain_prefix([3]) == 0
    assert chain_prefix([]) == 0
    assert tree_depth([]) == 0 and tree_depth([-1, 0, -1, 2, 3]) == 3 and tree_depth([-1, -1]) == 1
    with pytest.raises(ValueError, match="row tokens"):
        tree_accept([1, 2], [-1, 0], [1, 2])
    with pytest.raises(ValueError, match="parents must precede"):
        preorder([1, 2], [-1, 1])
    with pytest.raises(ValueError, match="2 drafts but 1 parents"):
        preorder([1, 2], [-1])
