"""Exact greedy verification of a draft against the target model's argmax tokens.

For a request that decoded draft tokens d1..dk after its last known token,
``target[i]`` is the target model's argmax after (last token, d1..di), so
``len(target) == k + 1``. Draft d_{i+1} is accepted while every earlier one was
and d_{i+1} == target[i]. With a drafts accepted, the step emits target[0..a]:
the a accepted drafts (equal to target[0..a-1]) followed by the target's own next
token target[a]. The emitted tokens are exactly what greedy decoding without
speculation would have produced.

A draft *tree* (``tree_accept``) is verified by walking it: at each node the row's
own token (the argmax, or a draw from the node's distribution for sampled
requests) is emitted, and the walk continues into the child drafted with that
token, if any. For one-hot drafts this is the multi-candidate form of speculative
sampling (accept child c1 with probability p(c1), else c2 with p(c2) / (1 - p(c1)),
...; the residual is p without the children): the emitted token is distributed as p.
"""
from __future__ import annotations

from collections.abc import Sequence


def greedy_accept(drafts: Sequence[int], target: Sequence[int]) -> int:
    """Number of leading drafts equal to the target's argmax tokens (0..len(drafts))."""
    if len(target) != len(drafts) + 1:
        raise ValueError(f"greedy_accept: need len(target) == len(drafts) + 1, got "
                         f"{len(target)} target tokens for {len(drafts)} drafts")
    a = 0
    while a < len(drafts) and int(drafts[a]) == int(target[a]):
        a += 1
    return a


def emitted_tokens(drafts: Sequence[int], target: Sequence[int]) -> list[int]:
    """Tokens one verified step emits: the accepted drafts plus the target's next token."""
    a = greedy_accept(drafts, target)
    return [int(t) for t in target[:a + 1]]


def tree_accept(drafts: Sequence[int], parents: Sequence[int], row_tokens: Sequence[int]) -> list[int]:
    """The accepted path of a draft tree: indices into ``drafts``, root first.

    ``parents[i]`` is the index of draft i's parent (-1: the request's last token, the
    root); ``row_tokens`` holds the target's token at the root row and at each draft's
    row (``len(drafts) + 1``). The step emits ``row_tokens`` at rows 0, 1 + path[0], ...
    (``len(path) + 1`` tokens; the first ``len(path)`` equal the accepted drafts).
    """
    if len(parents) != len(drafts) or len(row_tokens) != len(drafts) + 1:
        raise ValueError(f"tree_accept: {len(drafts)} drafts need as many parents and "
                         f"{len(drafts) + 1} row tokens, got {len(parents)} and {len(row_tokens)}")
    path: list[int] = []
    node, row = -1, 0
    while True:
        token = int(row_tokens[row])
        child = next((i for i in range(node + 1, len(drafts))
                      if parents[i] == node and int(drafts[i]) == token), None)
        if child is None:
            return path
        path.append(child)
        node, row = child, child + 1


def preorder(drafts: Sequence[int], parents: Sequence[int]) -> tuple[list[int], list[int]]:
    """The tree re-ordered depth first, children in their drafted (most probable first)
    order, so that the chain of first children is drafts 0, 1, 2, ...: KV computed for an
    accepted run along that chain is already in the right cache slots. Returns (drafts,
    parents) in the new order; parents still precede children."""
    if len(drafts) != len(parents):
        raise ValueError(f"preorder: {len(drafts)} drafts but {len(parents)} parents")
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        if not -1 <= int(p) < i:
            raise ValueError(f"preorder: draft {i} has parent {p}; parents must precede children")
        children.setdefault(int(p), []).append(i)
    order: list[int] = []
    stack = list(reversed(children.get(-1, [])))
    while stack:
        i = stack.pop()
        order.append(i)
        stack.extend(reversed(children.get(i, [])))
    new_index = {old: new for new, old in enumerate(order)}
    return ([int(drafts[i]) for i in order],
            [-1 if parents[i] < 0 else new_index[int(parents[i])] for i in order])


def chain_prefix(path: Sequence[int]) -> int:
    """How many leading path nodes are drafts 0, 1, 2, ... (their KV slots are final)."""
    m = 0
    while m < len(path) and path[m] == m:
        m += 1
    return m


def tree_depth(parents: Sequence[int]) -> int:
    """The number of drafts on the longest root path of a draft tree (0 for no drafts)."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return max(depth, default=0)
