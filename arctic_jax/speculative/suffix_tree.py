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
  score = sum(probs); the draft of highest score wins, among equal scores the longest match.

Storage: a node holds a run of tree positions with equal counts (path compression).
A suffix seen once ends in a leaf that grows with its sequence without being touched
(an *open* leaf: its run ends where the sequence ends, or at max_depth), and a run is
cut only where a second suffix enters it, so a stored token costs about one node (not
max_depth) and appending a token visits only the suffixes seen more than once; runs are
never merged back after removals. Pure Python; not thread-safe.

Cost (all exact, the drafts are those of the definitions): a sequence's active suffixes
give the match positions of its own tail, so ``speculate_stored`` walks from the root only
for match lengths longer than the stored sequence; match lengths are visited longest first
and skipped when their bound min(budget, max_depth - m) cannot beat the best score.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import numbers
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
_SLACK = 1.0 + 1e-9   # room for rounding in the score bounds of speculate_stored


class _Node:
    """A run of tree positions, all with the same count, the tokens ``seq[start : start + len]``
    (``seq`` is a stored token list; it is append-only, so a removed sequence's list stays valid
    for nodes still pointing into it). Children hang off the run's last position; a suffix only
    ever ends at a run's last position.

    A closed node's run has ``length`` positions (``cap`` = -1). An open leaf (``cap`` >= 0,
    always count 1) belongs to the one suffix through it and grows with its sequence: its run
    ends at min(len(seq), cap), cap being where that suffix reaches max_depth; ``length`` is
    unused. ``ordered`` caches the children in sibling order (None = not computed or stale).
    """

    __slots__ = ("token", "count", "children", "best", "ordered", "seq", "start", "length", "cap")

    def __init__(self, seq: list[int], start: int, length: int, count: int, cap: int = -1) -> None:
        self.token = seq[start] if length else -1
        self.count = count
        self.children: Mapping[int, _Node] = _NO_CHILDREN   # a dict once it has a child
        self.best: _Node | None = None   # cached best child; None = no children or stale
        self.ordered: list[_Node] | None = None
        self.seq = seq
        self.start = start
        self.length = length
        self.cap = cap


def _run_length(node: _Node) -> int:
    """Positions in node's run."""
    cap = node.cap
    if cap < 0:
        return node.length
    n = len(node.seq)
    return (n if n < cap else cap) - node.start


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
    ordered = node.ordered
    if ordered is None:
        ordered = node.ordered = sorted(node.children.values(), key=lambda c: (-c.count, c.token))
    return ordered


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

    A tree position (node, off) with 1 <= off <= run length stands for the token string
    path(node)[:depth(node) - run length + off]; the module docstring's per-string
    definitions apply to positions. Each sequence keeps up to max_depth active nodes, longest
    suffix first: its suffixes still growing, each ending at the last position of its node.
    The leading ones seen only once are open leaves (their number is kept per sequence).
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = check_int("SuffixTree: max_depth", max_depth, 1)
        self._root = _Node([], 0, 0, 0)
        self._seqs: dict[Hashable, list[int]] = {}
        self._active: dict[Hashable, list[_Node]] = {}
        self._open: dict[Hashable, int] = {}   # leading active nodes known to be open leaves
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

    def tokens_view(self, seq_id: Hashable) -> list[int]:
        """The stored token list of seq_id itself, no copy (read only; KeyError when absent)."""
        return self._seqs[seq_id]

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
        if off < _run_length(node):
            return [(node.seq[node.start + off], node.count)]
        return [(c.token, c.count) for c in _ordered_children(node)]

    def best_child(self, path: Sequence[int]) -> int | None:
        """Token of path's best child (None when it has none)."""
        children = self.children(path)
        return children[0][0] if children else None

    def _locate(self, path: Sequence[int]) -> tuple[_Node | None, int]:
        """The position (node, off) of path, or (None, -1) when it is not stored."""
        node, off, length = self._root, 0, 0
        for t in path:
            if off < length:
                if node.seq[node.start + off] != t:
                    return None, -1
                off += 1
            else:
                node = node.children.get(t)
                if node is None:
                    return None, -1
                off, length = 1, _run_length(node)
        return node, off

    def _open_prefix(self, seq_id: Hashable) -> int:
        """How many leading active nodes of seq_id are open leaves. Other sequences may have
        closed some since (a suffix entering one also enters every shorter active suffix of it, so
        the closed ones among them are the last)."""
        n_open, active = self._open[seq_id], self._active[seq_id]
        while n_open and active[n_open - 1].cap < 0:
            n_open -= 1
        self._open[seq_id] = n_open
        return n_open

    # ---- updates ----------------------------------------------------------------------------
    def extend(self, seq_id: Hashable, tokens: Iterable[int]) -> None:
        """Append tokens to sequence seq_id (created when new), adding their suffixes."""
        toks = _as_tokens("SuffixTree.extend", tokens)
        if seq_id not in self._seqs:
            self._seqs[seq_id], self._active[seq_id], self._open[seq_id] = [], [], 0
        if toks:
            self._extend(seq_id, toks)

    def _extend(self, seq_id: Hashable, toks: list[int]) -> None:
        seq, active = self._seqs[seq_id], self._active[seq_id]
        n_open = self._open_prefix(seq_id)
        root, depth = self._root, self.max_depth
        for tok in toks:
            pos = len(seq)
            seq.append(tok)            # the open leaves among the active nodes grow with it
            active.append(root)
            if len(active) > depth:
                del active[0]          # its suffix has reached max_depth tokens
                if n_open:
                    n_open -= 1
            n_active = len(active)
            first_cap = pos + 1 + depth - n_active   # where active[0]'s suffix reaches max_depth
            for i in range(n_open, n_active):
                node = active[i]
                count = node.count
                if count == 1 and node is not root:
                    # only this suffix reaches node (removals left it a leaf): open it at seq's end
                    node.seq, node.start, node.cap = seq, pos - node.length, first_cap + i
                    continue
                children = node.children
                child = children.get(tok)
                if child is None:
                    if children is _NO_CHILDREN:
                        children = node.children = {}
                    child = children[tok] = _Node(seq, pos, 1, 1, first_cap + i)
                    self._num_nodes += 1
                else:
                    cap = child.cap
                    if (child.length if cap < 0 else _run_length(child)) > 1:
                        if count == child.count + 1 and len(children) == 1 and node is not root:
                            # only this suffix ends at node, and child's first position would get
                            # node's count: move that position from child's run to the end of node's
                            node.seq, node.start = child.seq, child.start - node.length
                            node.length += 1
                            child.start += 1
                            if cap < 0:
                                child.length -= 1
                            child.token = child.seq[child.start]
                            node.children = {child.token: child}
                            continue
                        child = self._split(node, child)
                    elif cap >= 0:   # an open leaf of one position: a second suffix enters it
                        child.length, child.cap = 1, -1
                    child.count += 1
                best = node.best
                if best is not child:    # (an increment of the best child keeps the order)
                    if best is None:
                        if len(children) == 1:
                            node.best = child
                    elif child.count > best.count or (child.count == best.count and child.token < best.token):
                        node.best = child
                    node.ordered = None
                active[i] = child
            while n_open < len(active) and active[n_open].cap >= 0:
                n_open += 1
            root.count += 1
        self._open[seq_id] = n_open

    def _split(self, parent: _Node, child: _Node) -> _Node:
        """Cut child's first position into a new node between parent and child; return it.

        child keeps its identity (active suffixes ending at its last position stay valid)."""
        head = _Node(child.seq, child.start, 1, child.count)
        head.children = {child.seq[child.start + 1]: child}
        head.best = child
        child.start += 1
        if child.cap < 0:
            child.length -= 1
        child.token = child.seq[child.start]
        parent.children[head.token] = head
        if parent.best is child:
            parent.best = head
        parent.ordered = None
        self._num_nodes += 1
        return head

    def remove(self, seq_id: Hashable) -> None:
        """Remove sequence seq_id and all its suffix counts (ValueError when absent)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"SuffixTree.remove: unknown sequence id {seq_id!r}")
        del self._active[seq_id], self._open[seq_id]
        root, depth = self._root, self.max_depth
        for start in range(len(seq)):
            end = min(start + depth, len(seq))
            node, i = root, start
            while i < end:    # the suffix's runs: it ends at a run's last position
                child = node.children[seq[i]]
                child.count -= 1
                node.ordered = None
                if node.best is child:
                    node.best = None       # stale: rescanned on the next lookup
                if child.count == 0:
                    # every position below has count 0 too: drop the whole branch
                    del node.children[seq[i]]
                    self._num_nodes -= self._subtree_size(child)
                    break
                i += child.length          # count >= 1 left: it was >= 2, so not an open leaf
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
        best = self.speculate_stored(ctx, len(ctx), None, max_spec, factor, offset, min_prob,
                                     bool(use_tree_spec), -1.0)
        return Draft() if best is None else as_draft(best)

    def speculate_stored(self, tokens: list[int], n: int, seq_id: Hashable | None, max_spec: int,
                         factor: float, offset: float, min_prob: float, use_tree: bool,
                         floor: float) -> tuple | None:
        """``speculate`` without argument checks, for callers that hold validated values.

        The context is tokens[-n:] (a list of ints, n <= max_depth). seq_id is None or a stored
        sequence that ends with the context's last min(n, its length) tokens: the positions of
        those suffixes of the context are its active nodes (only longer ones are walked from the
        root). Returns the best draft as (token_ids, parents or None = a path, probs, score,
        match_len) when its score > floor (-1.0: whenever some suffix matches), else None.
        """
        if n < 2:
            return None
        depth, end = self.max_depth, len(tokens)
        if seq_id is None:
            active, n_active, n_open = (), 0, 0
        else:
            active = self._active[seq_id]
            n_active, n_open = len(active), self._open_prefix(seq_id)
        known = min(n_active, n - 1)       # m <= known: ctx[-m:] ends at active[n_active - m]
        longest = known
        walked: list[tuple[_Node, int]] = []
        while longest < n - 1:              # longer matches: walk from the root
            node, off = self._locate(tokens[end - longest - 1:])
            if node is None:
                break
            walked.append((node, off))
            longest += 1
        if longest == 0:
            return None
        leaves_above = n_active - n_open   # m in (leaves_above, known]: an open leaf, no draft
        # the best is the highest (score, m): a floor is beaten by a higher score only
        best, best_score, best_m = None, floor, n
        if leaves_above < known and best_score < 0.0:   # (score sum([]) = 0, as drafting gives)
            best, best_score, best_m = ([], None, [], 0, known), 0, known
        budgets, caps, order = _budget_table(max_spec, factor, offset, depth)
        for m in order:          # by cap = min(budget, depth - m) (>= the score), highest first
            cap = caps[m]
            if cap < best_score:
                break
            if m > longest or leaves_above < m <= known or (cap <= best_score and m < best_m):
                continue
            if m <= known:
                node = active[n_active - m]
                off = _run_length(node)
                at_end = True
            else:
                node, off = walked[m - known - 1]
                at_end = off == _run_length(node)
            budget = budgets[m]
            if at_end:
                # every prob is <= the first step's, and a level's probs sum to <= the children's
                # share of the count: tighter bounds
                child = node.best or _best_child(node)
                p1 = 0.0 if child is None else child.count / node.count
                bound = cap * p1 if not use_tree else min(budget * p1, depth - m) * _SLACK
                if bound < best_score or (bound <= best_score and m < best_m):
                    continue
                children = node.children
                if use_tree and len(children) < 8:
                    share = sum(c.count for c in children.values()) / node.count
                    bound = min(bound, (depth - m) * share * _SLACK)
                    if bound < best_score or (bound <= best_score and m < best_m):
                        continue
            if use_tree:
                toks, parents, probs = _draft_tree(node, off, budget, min_prob)
            else:
                toks, probs = _draft_path(node, off, budget, min_prob)
                parents = None
            score = sum(probs)
            if score > best_score or (score == best_score and m > best_m):
                best, best_score, best_m = (toks, parents, probs, score, m), score, m
        return best


@functools.lru_cache(maxsize=64)
def _budget_table(max_spec: int, factor: float, offset: float,
                  depth: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per match length m < depth: the budget, cap = min(budget, depth - m) (with room for
    rounding: no draft from m scores more), and the m's by decreasing cap (then decreasing m)."""
    budgets = tuple(max(0, min(max_spec, math.floor(m * factor + offset + 1e-6))) for m in range(depth))
    caps = tuple(min(b, depth - m) * _SLACK for m, b in enumerate(budgets))
    order = tuple(sorted(range(1, depth), key=lambda m: (-caps[m], -m)))
    return budgets, caps, order


def as_draft(best: tuple) -> Draft:
    """A ``Draft`` from ``speculate_stored``'s (token_ids, parents, probs, score, match_len)."""
    toks, parents, probs, score, m = best
    if parents is None:
        parents = range(-1, len(toks) - 1)
    return Draft(tuple(toks), tuple(parents), tuple(probs), score, m)


def _draft_path(node: _Node, off: int, budget: int, min_prob: float) -> tuple[list[int], list[float]]:
    """Path draft from position (node, off): tokens and probs (parents are -1, 0, 1, ...)."""
    tokens: list[int] = []
    probs: list[float] = []
    prob = 1.0
    if budget <= 0 or prob < min_prob:
        return tokens, probs
    room = budget
    while True:
        length = _run_length(node)
        if off < length:                 # inside a run: the one child has the same count
            take = min(length - off, room)
            s = node.start + off
            tokens += node.seq[s:s + take]
            probs += [prob] * take
            room -= take
            if not room:
                break
        child = node.best
        if child is None:
            child = _best_child(node)
            if child is None:
                break
        prob = prob * (child.count / node.count)
        if prob < min_prob:
            break
        node, off = child, 0
    return tokens, probs


def _draft_tree(node: _Node, off: int, budget: int,
                min_prob: float) -> tuple[list[int], list[int], list[float]]:
    """Tree draft from position (node, off): tokens, parents and probs in drafting order.

    A candidate that the heap would hand back at once (its prob above every queued one) is
    taken without queueing it; queued entries keep their push order, so the result is the same."""
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    if budget <= 0:
        return tokens, parents, probs
    heappush, heappop = heapq.heappush, heapq.heappop
    # entries (-prob, push order, node, off, parent): the candidate is position (node, off + 1)
    heap: list[tuple[float, int, _Node, int, int]] = []
    order = 0
    n, o, prob, parent = node, off, 1.0, -1
    while True:
        # the successors of position (n, o), drafted with prob, as children of parent
        length = _run_length(n)
        take = None
        if o < length:
            if prob >= min_prob:
                if not heap or heap[0][0] > -prob:
                    take = n
                else:
                    heappush(heap, (-prob, order, n, o, parent))
                    order += 1
        elif n.children:
            count = n.count
            for child in _ordered_children(n):
                p = prob * (child.count / count)
                if p < min_prob:
                    break
                if take is None and (not heap or heap[0][0] > -p):
                    take, take_p = child, p     # the first (highest) child, ahead of the queue
                else:
                    heappush(heap, (-p, order, child, 0, parent))
                order += 1
            if take is not None:
                prob, o = take_p, 0
        if take is None:
            if not heap:
                break
            neg_p, _, n, o, parent = heappop(heap)
            prob = -neg_p
        else:
            n = take
        seq, start = n.seq, n.start
        tokens.append(seq[start + o])
        parents.append(parent)
        probs.append(prob)
        # the rest of the run comes next while no queued candidate has as high a prob
        length = _run_length(n)
        while o + 1 < length and len(tokens) < budget and (not heap or heap[0][0] > -prob):
            o += 1
            parents.append(len(tokens) - 1)
            tokens.append(seq[start + o])
            probs.append(prob)
        if len(tokens) >= budget:
            break
        o += 1
        parent = len(tokens) - 1
    return tokens, parents, probs
