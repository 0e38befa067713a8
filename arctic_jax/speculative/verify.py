"""Exact greedy verification of a draft against the target model's argmax tokens.

For a request that decoded draft tokens d1..dk after its last known token,
``target[i]`` is the target model's argmax after (last token, d1..di), so
``len(target) == k + 1``. Draft d_{i+1} is accepted while every earlier one was
and d_{i+1} == target[i]. With a drafts accepted, the step emits target[0..a]:
the a accepted drafts (equal to target[0..a-1]) followed by the target's own next
token target[a]. The emitted tokens are exactly what greedy decoding without
speculation would have produced.
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
