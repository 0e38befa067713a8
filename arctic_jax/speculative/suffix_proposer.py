"""Suffix decoding (Arctic Inference's ``method: "suffix"``) as a ``Proposer``.

Two depth-bounded suffix trees (``suffix_tree.SuffixTree``):

- a **per-request tree** over the request's prompt followed by its accepted output,
  built on first sight (in ``propose`` or ``on_tokens``) and dropped by ``on_finish``;
- one **global tree** over responses only (never prompts): each request's output is
  one sequence, fed live as it grows, kept after the request finishes, and evicted
  FIFO (by first sight) while more than ``max_cached_requests`` are held; the oldest
  may be a running request, whose response then stops being cached.
  ``max_cached_requests=0`` disables the global tree; ``-1`` or ``None`` = unlimited.

``propose`` speculates on both trees with max_spec = k and keeps the higher score,
ties to the per-request tree. A request's ``prompt_ids + output_ids`` are the source
of truth: before each use the stored state is topped up from ``output_ids`` when it
is behind and rebuilt when it disagrees (a cheap check of the stored length and last
max_depth tokens), so missed ``on_tokens`` calls, tokens reported twice after a
preemption, or a reused request id never desynchronise it. Drafts only affect speed.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from arctic_jax.speculative.suffix_tree import Draft, SuffixTree, check_int, check_real

if TYPE_CHECKING:
    from arctic_jax.speculative.proposer import ProposerRequest

_LOCAL = 0   # the one sequence id of a per-request tree


class _RequestState:
    __slots__ = ("tree", "prompt_len", "global_key")

    def __init__(self, tree: SuffixTree, prompt_len: int, global_key: int | None) -> None:
        self.tree = tree
        self.prompt_len = prompt_len
        self.global_key = global_key   # its response's sequence in the global tree (None = not cached)


def _concat_from(prompt: Sequence[int], output: Sequence[int], start: int) -> list[int]:
    """(prompt + output)[start:] without building the whole concatenation."""
    n = len(prompt)
    if start >= n:
        return list(output[start - n:])
    return list(prompt[start:]) + list(output)


def _tail_agrees(stored_tail: list[int], full: Sequence[int], stored_len: int) -> bool:
    """Whether stored_tail equals full[stored_len - len(stored_tail) : stored_len]."""
    n = len(stored_tail)
    return list(full[stored_len - n:stored_len]) == stored_tail


class SuffixProposer:
    """Suffix-decoding proposer (module docstring). Not thread-safe."""

    def __init__(self, max_depth: int = 24, max_cached_requests: int | None = 10000,
                 max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
                 min_token_prob: float = 0.1, use_tree_spec: bool = False) -> None:
        self.max_depth = check_int("SuffixProposer: max_depth", max_depth, 1)
        if max_cached_requests is None:
            max_cached_requests = -1
        self.max_cached_requests = check_int("SuffixProposer: max_cached_requests",
                                              max_cached_requests, -1)
        self.max_spec_factor = check_real("SuffixProposer: max_spec_factor", max_spec_factor)
        self.max_spec_offset = check_real("SuffixProposer: max_spec_offset", max_spec_offset)
        self.min_token_prob = check_real("SuffixProposer: min_token_prob", min_token_prob)
        if not isinstance(use_tree_spec, bool):
            raise ValueError(f"SuffixProposer: use_tree_spec must be a bool, got {use_tree_spec!r}")
        self.use_tree_spec = use_tree_spec
        self._requests: dict[str, _RequestState] = {}
        self._global = SuffixTree(self.max_depth) if self.max_cached_requests != 0 else None
        self._fifo: OrderedDict[int, str | None] = OrderedDict()   # global key -> live request id
        self._keys = itertools.count()

    # ---- inspection -------------------------------------------------------------------------
    @property
    def num_tracked(self) -> int:
        """Requests whose per-request tree is held (for leak checks)."""
        return len(self._requests)

    @property
    def num_cached_responses(self) -> int:
        """Responses held in the global tree (live and finished)."""
        return len(self._fifo)

    @property
    def global_tree(self) -> SuffixTree | None:
        return self._global

    def local_tree(self, request_id: str) -> SuffixTree | None:
        state = self._requests.get(request_id)
        return None if state is None else state.tree

    # ---- Proposer protocol ------------------------------------------------------------------
    def propose(self, requests: Sequence[ProposerRequest], k: int) -> list[list[int]]:
        """One draft (0..k token ids) per request, in order; tree mode gives each tree's best path."""
        return [d.best_path() if self.use_tree_spec else list(d.token_ids)
                for d in self.propose_drafts(requests, k)]

    def propose_drafts(self, requests: Sequence[ProposerRequest], k: int) -> list[Draft]:
        """One ``Draft`` (at most k tokens) per request, in order."""
        k = check_int("SuffixProposer.propose: k", k, 0)
        states = [self._sync(req) for req in requests]   # all first: the global tree sees every response
        out = []
        for state in states:
            ctx = state.tree.seq_tail(_LOCAL, self.max_depth)
            draft = self._speculate(state.tree, ctx, k)
            if self._global is not None and len(self._global):
                other = self._speculate(self._global, ctx, k)
                if other.score > draft.score:
                    draft = other
            out.append(draft)
        return out

    def on_tokens(self, request: ProposerRequest, new_tokens: Sequence[int]) -> None:
        """The request accepted new_tokens; its state is brought up to prompt_ids + output_ids."""
        self._sync(request)

    def on_finish(self, request: ProposerRequest) -> None:
        """Drop the per-request tree; the response stays in the global tree until evicted."""
        if request.request_id not in self._requests:
            return
        state = self._sync(request)   # may rebuild the state (then its global sequence is new)
        del self._requests[request.request_id]
        if state.global_key is not None:
            self._fifo[state.global_key] = None   # no longer live

    # ---- internals --------------------------------------------------------------------------
    def _speculate(self, tree: SuffixTree, ctx: list[int], k: int) -> Draft:
        return tree.speculate(ctx, k, self.max_spec_factor, self.max_spec_offset,
                              self.min_token_prob, self.use_tree_spec)

    def _sync(self, req: ProposerRequest) -> _RequestState:
        rid, prompt, output = req.request_id, req.prompt_ids, req.output_ids
        n_prompt, expected = len(prompt), len(prompt) + len(output)
        state = self._requests.get(rid)
        if state is not None:
            have = state.tree.seq_len(_LOCAL)
            tail = state.tree.seq_tail(_LOCAL, self.max_depth)
            if state.prompt_len == n_prompt and have <= expected:
                known = _concat_from(prompt, output, have - len(tail))
                if known[:len(tail)] == tail:
                    if have < expected:
                        state.tree.extend(_LOCAL, known[len(tail):])
                    self._sync_global(state, output)
                    return state
            self._drop_global(state)
        tree = SuffixTree(self.max_depth)
        tree.extend(_LOCAL, _concat_from(prompt, output, 0))
        state = self._requests[rid] = _RequestState(tree, n_prompt, self._add_global(rid, output))
        return state

    def _sync_global(self, state: _RequestState, output: Sequence[int]) -> None:
        key = state.global_key
        if key is None or self._global is None:
            return
        have = self._global.seq_len(key)
        tail = self._global.seq_tail(key, self.max_depth)
        if have <= len(output) and _tail_agrees(tail, output, have):
            if have < len(output):
                self._global.extend(key, output[have:])
            return
        rid = self._fifo[key]
        self._drop_global(state)
        state.global_key = self._add_global(rid, output)

    def _add_global(self, rid: str, output: Sequence[int]) -> int | None:
        if self._global is None:
            return None
        key = next(self._keys)
        self._global.extend(key, output)   # an empty output still registers the sequence
        self._fifo[key] = rid
        while self.max_cached_requests > 0 and len(self._fifo) > self.max_cached_requests:
            old_key, old_rid = self._fifo.popitem(last=False)
            self._global.remove(old_key)
            if old_rid is not None:
                self._requests[old_rid].global_key = None
        return key

    def _drop_global(self, state: _RequestState) -> None:
        key = state.global_key
        if key is not None and self._global is not None:
            self._global.remove(key)
            del self._fifo[key]
        state.global_key = None
