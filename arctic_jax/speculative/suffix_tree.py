"""Depth-bounded suffix tree over token sequences, and suffix-decoding speculation on it.

Definitions (wave2-facts B.1-B.2):

- The tree stores sequences by id. For a token string p with 1 <= len(p) <= max_depth,
  ``count(p)`` is the number of occurrences of p in the stored sequences, i.e. the
  number of stored suffixes (each cut to max_depth tokens) that pass through or end
  at p's node. The root's count is the total number of stored tokens.
- The children of p are the tokens t with count(p + t) > 0 (only while len(p) < max_depth).
  They are ordered by count, highest first; **ties go to the smaller token id**. The
  best child is cached per node, so finding it is O(1) amortised (an increment
  updates the cache in O(1); a decrement of the cached best child marks it stale,
  and the next lookup rescans that node's children).
- ``speculate`` clips the context to its last max_depth tokens, then for
  m = 1 .. len(ctx) - 1 finds the node of the last m tokens (stopping at the first
  miss) and drafts from it with budget max(0, min(max_spec, floor(m*factor + offset + 1e-6))):
  * path mode: prob = 1; repeatedly step to the best child c of node n with
    prob = prob * (c.count / n.count), stopping at the budget, when prob < min_prob,
    or at a leaf; each step emits c's token with parent = the previous token;
  * tree mode: best-first over candidate nodes by prob (max-heap, **ties to the
    candidate pushed first**); a popped candidate emits its token, then pushes its
    children in order while prob * (c.count / n.count) >= min_prob; stop after
    budget tokens or when no candidates are left.
  score = sum(probs); a draft replaces the best so far when its score >= the best
  score, so among equal scores the longest match wins.

Storage: a node holds a run of tree positions with equal counts (path compression).
A suffix seen once grows its leaf run in place, and a run is cut only where a second
suffix enters it, so a stored token costs about one node (not max_depth); runs are
never merged back after removals. Pure Python; not thread-safe.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import numbers
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from types import MappingProxyType


@dataclasses.dataclass(frozen=True)
class Draft:
    """A drafted token tree (a path is the special case parents = (-1, 0, 1, ...)).

    token_ids[i] is a draft token, parents[i] the index of its parent draft token
    (-1 = it follows the context directly), probs[i] its estimated probability,
    score = sum(probs), match_len = the number of context tokens matched (0 = none).
    Tokens appear in the order they were drafted, so parents[i] < i.
    """

    token_ids: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    score: float = 0.0
    match_len: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    def best_path(self) -> list[int]:
        """The chain from the root that always takes the first-drafted (most probable) child."""
        out, cur = [], -1
        for i, parent in enumerate(self.parents):
            if parent == cur:
                out.append(self.token_ids[i])
                cur = i
        return out


_NO_CHILDREN: Mapping = MappingProxyType({})   # shared by all leaves (saves a dict per node)


class _Node:
    """A run of ``length`` tree positions, all with the same count, the tokens
    ``seq[start : start + length]`` (``seq`` is a stored token list; it is append-only, so a
    removed sequence's list stays valid for nodes still pointing into it). Children
    hang off the run's last position; a suffix only ever ends at a run's last position."""

    __slots__ = ("token", "count", "children", "best", "seq", "start", "length")

    def __init__(self, seq: list[int], start: int, length: int, count: int) -> None:
        self.token = seq[start] if length else -1
        self.count = count
        self.children: Mapping[int, _Node] = _NO_CHILDREN   # a dict once it has a child
        self.best: _Node | None = None   # cached best child; None = no children or stale
        self.seq = seq
        self.start = start
        self.length = length


def _better(a: _Node, b: _Node) -> bool:
    """Whether a comes before b among siblings: higher count, then smaller token id."""
    return a.count > b.count or (a.count == b.count and a.token < b.token)


def _best_child(node: _Node) -> _Node | None:
    best = node.best
    if best is None and node.children:
        for child in node.children.values():
            if best is None or _better(child, best):
                best = child
        node.best = best
    return best


def _ordered_children(node: _Node) -> list[_Node]:
    return sorted(node.children.values(), key=lambda c: (-c.count, c.token))


def check_int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def check_real(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _as_tokens(name: str, tokens: Iterable[int]) -> list[int]:
    out = []
    for t in tokens:
        if type(t) is int:
            out.append(t)
            continue
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{name}: token ids must be integers, got {t!r}")
        out.append(int(t))
    return out


class SuffixTree:
    """Depth-bounded, path-compressed suffix tree of token sequences keyed by a hashable seq id.

    A tree position (node, off) with 1 <= off <= node.length stands for the token string
    path(node)[:depth(node) - node.length + off]; the module docstring's per-string
    definitions apply to positions. Each sequence keeps up to max_depth active nodes:
    its suffixes still growing, each ending at the last position of its node.
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = check_int("SuffixTree: max_depth", max_depth, 1)
        self._root = _Node([], 0, 0, 0)
        self._seqs: dict[Hashable, list[int]] = {}
        self._active: dict[Hashable, deque[_Node]] = {}
        self._num_nodes = 1

    # ---- inspection -------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        """Nodes in the tree, root included (each holds a run of positions)."""
        return self._num_nodes

    @property
    def num_tokens(self) -> int:
        """Stored tokens over all sequences (= the root's count)."""
        return self._root.count

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def sequence(self, seq_id: Hashable) -> list[int]:
        """A copy of the stored tokens of seq_id."""
        return list(self._seqs[seq_id])

    def seq_len(self, seq_id: Hashable) -> int:
        """Stored length of seq_id (0 when absent)."""
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else len(seq)

    def seq_tail(self, seq_id: Hashable, n: int) -> list[int]:
        """The last min(n, length) stored tokens of seq_id."""
        seq = self._seqs.get(seq_id, [])
        return seq[max(0, len(seq) - n):]

    def count(self, path: Sequence[int]) -> int:
        """count(path) per the module docstring (0 when absent or longer than max_depth)."""
        node, _ = self._locate(path)
        return 0 if node is None else node.count

    def children(self, path: Sequence[int]) -> list[tuple[int, int]]:
        """(token, count) of path's children in sibling order (best first)."""
        node, off = self._locate(path)
        if node is None:
            return []
        if off < node.length:
            return [(node.seq[node.start + off], node.count)]
        return [(c.token, c.count) for c in _ordered_children(node)]

    def best_child(self, path: Sequence[int]) -> int | None:
        """Token of path's best child (None when it has none)."""
        children = self.children(path)
        return children[0][0] if children else None

    def _locate(self, path: Sequence[int]) -> tuple[_Node | None, int]:
        """The position (node, off) of path, or (None, -1) when it is not stored."""
        node, off = self._root, 0
        for t in path:
            if off < node.length:
                if node.seq[node.start + off] != t:
                    return None, -1
                off += 1
            else:
                node = node.children.get(t)
                if node is None:
                    return None, -1
                off = 1
        return node, off

    # ---- updates ----------------------------------------------------------------------------
    def extend(self, seq_id: Hashable, tokens: Iterable[int]) -> None:
        """Append tokens to sequence seq_id (created when new), adding their suffixes."""
        toks = _as_tokens("SuffixTree.extend", tokens)
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = []
            self._active[seq_id] = deque()
        active = self._active[seq_id]
        root, depth = self._root, self.max_depth
        for tok in toks:
            pos = len(seq)
            seq.append(tok)
            active.append(root)
            if len(active) > depth:
                active.popleft()       # its suffix has reached max_depth tokens
            for i, node in enumerate(active):
                if node.count == 1 and node is not root:
                    # only this suffix reaches node, a leaf: lengthen its run in place
                    if node.seq is not seq or node.start + node.length != pos:
                        node.seq, node.start = seq, pos - node.length
                    node.length += 1
                    continue
                child = node.children.get(tok)
                if child is None:
                    if node.children is _NO_CHILDREN:
                        node.children = {}
                    child = node.children[tok] = _Node(seq, pos, 1, 0)
                    self._num_nodes += 1
                elif child.length > 1:
                    child = self._split(node, child)
                child.count += 1
                best = node.best
                if best is not None and best is not child and _better(child, best):
                    node.best = child
                elif best is None and len(node.children) == 1:
                    node.best = child
                active[i] = child
            root.count += 1

    def _split(self, parent: _Node, child: _Node) -> _Node:
        """Cut child's first position into a new node between parent and child; return it.

        child keeps its identity (active suffixes ending at its last position stay valid)."""
        head = _Node(child.seq, child.start, 1, child.count)
        head.children = {child.seq[child.start + 1]: child}
        head.best = child
        child.start += 1
        child.length -= 1
        child.token = child.seq[child.start]
        parent.children[head.token] = head
        if parent.best is child:
            parent.best = head
        self._num_nodes += 1
        return head

    def remove(self, seq_id: Hashable) -> None:
        """Remove sequence seq_id and all its suffix counts (ValueError when absent)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"SuffixTree.remove: unknown sequence id {seq_id!r}")
        del self._active[seq_id]
        root, depth = self._root, self.max_depth
        for start in range(len(seq)):
            end = min(start + depth, len(seq))
            node, i = root, start
            while i < end:    # the suffix's runs: it ends at a run's last position
                child = node.children[seq[i]]
                child.count -= 1
                if node.best is child:
                    node.best = None       # stale: rescanned on the next lookup
                if child.count == 0:
                    # every position below has count 0 too: drop the whole branch
                    del node.children[seq[i]]
                    self._num_nodes -= self._subtree_size(child)
                    break
                i += child.length
                node = child
        root.count -= len(seq)

    @staticmethod
    def _subtree_size(node: _Node) -> int:
        size, stack = 0, [node]
        while stack:
            n = stack.pop()
            size += 1
            stack.extend(n.children.values())
        return size

    # ---- speculation --------------------------------------------------------------------------
    def speculate(self, context: Sequence[int], max_spec_tokens: int, max_spec_factor: float = 1.0,
                  max_spec_offset: float = 0.0, min_token_prob: float = 0.1,
                  use_tree_spec: bool = False) -> Draft:
        """The best draft for continuing context (rules in the module docstring)."""
        max_spec = check_int("SuffixTree.speculate: max_spec_tokens", max_spec_tokens, 0)
        factor = check_real("SuffixTree.speculate: max_spec_factor", max_spec_factor)
        offset = check_real("SuffixTree.speculate: max_spec_offset", max_spec_offset)
        min_prob = check_real("SuffixTree.speculate: min_token_prob", min_token_prob)
        ctx = _as_tokens("SuffixTree.speculate", context[-self.max_depth:])
        draft_fn = self._draft_tree if use_tree_spec else self._draft_path
        best = Draft()
        n = len(ctx)
        for m in range(1, n):
            node, off = self._locate(ctx[n - m:])
            if node is None:
                break
            budget = max(0, min(max_spec, math.floor(m * factor + offset + 1e-6)))
            tokens, parents, probs = draft_fn(node, off, budget, min_prob)
            score = sum(probs)
            if score >= best.score:
                best = Draft(tuple(tokens), tuple(parents), tuple(probs), score, m)
        return best

    @staticmethod
    def _draft_path(node: _Node, off: int, budget: int, min_prob: float):
        tokens: list[int] = []
        probs: list[float] = []
        prob = 1.0
        while len(tokens) < budget:
            if off < node.length:        # inside a run: the one child has the same count
                tok = node.seq[node.start + off]
                off += 1
            else:
                child = _best_child(node)
                if child is None:
                    break
                prob = prob * (child.count / node.count)
                node, off, tok = child, 1, child.token
            if prob < min_prob:
                break
            tokens.append(tok)
            probs.append(prob)
        return tokens, list(range(-1, len(tokens) - 1)), probs

    @staticmethod
    def _draft_tree(node: _Node, off: int, budget: int, min_prob: float):
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        order = itertools.count()
        # entries (-prob, push order, node, off, parent): the candidate is position (node, off + 1)
        heap: list[tuple[float, int, _Node, int, int]] = []

        def push_children(n: _Node, o: int, prob: float, parent: int) -> None:
            if o < n.length:
                if prob >= min_prob:
                    heapq.heappush(heap, (-prob, next(order), n, o, parent))
                return
            for child in _ordered_children(n):
                p = prob * (child.count / n.count)
                if p < min_prob:
                    break
                heapq.heappush(heap, (-p, next(order), child, 0, parent))

        if budget > 0:
            push_children(node, off, 1.0, -1)
        while heap and len(tokens) < budget:
            neg_p, _, n, o, parent = heapq.heappop(heap)
            tokens.append(n.seq[n.start + o])
            parents.append(parent)
            probs.append(-neg_p)
            if len(tokens) < budget:
                push_children(n, o + 1, -neg_p, len(tokens) - 1)
        return tokens, parents, probs
