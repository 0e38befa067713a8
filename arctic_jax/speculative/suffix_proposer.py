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
Speculation reads the match positions of the context's suffixes from the trees' active
suffixes (``SuffixTree.speculate_stored``); the global tree is only searched for a draft
that beats the per-request one.

``backend``: "native" runs both trees in the compiled ``arctic_jax_native`` extension
(``native_tree``; the same drafts at a fraction of the host cost: a sync is one call per tree, a
draft one call for both trees), "python" in ``suffix_tree.SuffixTree``, "auto" (default) the
compiled one when it is installed.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from arctic_jax.speculative.native_tree import (
    native_draft_tree_class,
    native_speculate_pair,
    native_suffix_tree_class,
)
from arctic_jax.speculative.suffix_tree import Draft, SuffixTree, as_draft, check_int, check_real

if TYPE_CHECKING:
    from arctic_jax.speculative.proposer import ProposerRequest

_LOCAL = 0   # the one sequence id of a per-request tree
BACKENDS = ("auto", "native", "python")   # auto: the compiled tree when installed


class _RequestState:
    __slots__ = ("tree", "prompt_len", "global_key", "owner", "synced")

    def __init__(self, tree, prompt_len: int, global_key: int | None) -> None:
        self.tree = tree               # its prompt + output, sequence _LOCAL
        self.prompt_len = prompt_len
        self.global_key = global_key   # its response's sequence in the global tree (None = not cached)
        self.owner = None              # the request object of the last sync, and its length then
        self.synced = -1


def _concat_from(prompt: Sequence[int], output: Sequence[int], start: int) -> list[int]:
    """(prompt + output)[start:] without building the whole concatenation."""
    n = len(prompt)
    if start >= n:
        return list(output[start - n:])
    return list(prompt[start:]) + list(output)


def _as_list(tokens: Sequence[int]) -> list:
    return tokens if type(tokens) is list else list(tokens)


def _agrees(prompt: Sequence[int], output: Sequence[int], stored: list[int], lo: int) -> bool:
    """Whether stored[lo:] equals (prompt + output)[lo : len(stored)] (len(stored) <= the total)."""
    n, hi = len(prompt), len(stored)
    if lo >= n:
        return _as_list(output[lo - n:hi - n]) == stored[lo:]
    if hi <= n:
        return _as_list(prompt[lo:hi]) == stored[lo:]
    return _as_list(prompt[lo:]) == stored[lo:n] and _as_list(output[:hi - n]) == stored[n:]


class _PythonTree(SuffixTree):
    """``SuffixTree`` with the native tree's ``sync`` (the proposer drives both backends alike)."""

    __slots__ = ()

    def sync(self, seq_id: int, head: Sequence[int], tail: Sequence[int], check: int) -> int:
        """Append (head + tail)[have:] when the stored sequence (have tokens) is no longer and its last
        ``check`` tokens agree with head + tail, returning how many; else (or when seq_id is
        absent) -1, nothing changed."""
        if seq_id not in self:
            return -1
        stored = self.tokens_view(seq_id)
        have, total = len(stored), len(head) + len(tail)
        if have > total or not _agrees(head, tail, stored, max(0, have - check)):
            return -1
        if have < total:
            self.extend(seq_id, _concat_from(head, tail, have))
        return total - have


def _python_speculate_pair(local: SuffixTree, local_seq: int, glob: SuffixTree | None,
                           glob_seq: int | None, k: int, factor: float, offset: float,
                           min_prob: float, use_tree: bool, draft_type: type) -> Draft:
    """``arctic_jax_native.speculate_pair`` on Python trees: the context is the last max_depth
    stored tokens of local_seq (the local tree's active suffixes); the global draft only when
    it scores higher (ties to local)."""
    tokens = local.tokens_view(local_seq)
    n = min(len(tokens), local.max_depth)
    best = local.speculate_stored(tokens, n, local_seq, k, factor, offset, min_prob, use_tree, -1.0)
    if glob is not None:
        other = glob.speculate_stored(tokens, n, glob_seq, k, factor, offset, min_prob, use_tree,
                                      0.0 if best is None else best[3])
        if other is not None:
            best = other
    return draft_type() if best is None else as_draft(best)


class SuffixProposer:
    """Suffix-decoding proposer (module docstring). Not thread-safe."""

    def __init__(self, max_depth: int = 24, max_cached_requests: int | None = 10000,
                 max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
                 min_token_prob: float = 0.1, use_tree_spec: bool = False,
                 backend: str = "auto") -> None:
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
        if backend not in BACKENDS:
            raise ValueError(f"SuffixProposer: backend must be one of {BACKENDS}, got {backend!r}")
        native_class = native_suffix_tree_class()
        native_pair = native_speculate_pair() if native_class is not None else None
        if backend == "native" and native_pair is None:
            raise ValueError("SuffixProposer: backend 'native' needs the compiled suffix tree "
                             "(pip install ./native)")
        self.backend = "native" if backend == "native" or (backend == "auto" and native_pair) else "python"
        if self.backend == "native":
            self._tree_class = native_draft_tree_class(native_class)
            self._speculate_pair = native_pair
        else:
            self._tree_class, self._speculate_pair = _PythonTree, _python_speculate_pair
        self._requests: dict[str, _RequestState] = {}
        self._global = self._tree_class(self.max_depth) if self.max_cached_requests != 0 else None
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
        if type(k) is not int or k < 0:
            k = check_int("SuffixProposer.propose: k", k, 0)
        states = [self._sync(req) for req in requests]   # all first: the global tree sees every response
        glob = self._global if self._global is not None and len(self._global) else None
        spec, factor, offset = self._speculate_pair, self.max_spec_factor, self.max_spec_offset
        min_prob, use_tree = self.min_token_prob, self.use_tree_spec
        # the context is the last max_depth stored tokens: the local tree's active suffixes
        return [spec(s.tree, _LOCAL, glob, s.global_key, k, factor, offset, min_prob, use_tree, Draft)
                for s in states]

    def on_tokens(self, request: ProposerRequest, new_tokens: Sequence[int]) -> None:
        """The request accepted new_tokens; its state is brought up to prompt_ids + output_ids.
        Nothing to do when this request object was synced at its current length (``propose``
        of the same step): output only grows or is cut, and ``propose`` checks every time."""
        state = self._requests.get(request.request_id)
        if (state is not None and state.owner is request
                and state.synced == len(request.prompt_ids) + len(request.output_ids)):
            return
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
    def _sync(self, req: ProposerRequest) -> _RequestState:
        rid, prompt, output = req.request_id, req.prompt_ids, req.output_ids
        state = self._requests.get(rid)
        if state is not None:
            depth = self.max_depth
            if state.prompt_len == len(prompt) and state.tree.sync(_LOCAL, prompt, output, depth) >= 0:
                key = state.global_key
                if key is not None and self._global.sync(key, (), output, depth) < 0:
                    live = self._fifo[key]
                    self._drop_global(state)
                    state.global_key = self._add_global(live, output)
                state.owner, state.synced = req, len(prompt) + len(output)
                return state
            self._drop_global(state)
        tree = self._tree_class(self.max_depth)
        tree.extend(_LOCAL, _concat_from(prompt, output, 0))
        state = self._requests[rid] = _RequestState(tree, len(prompt), self._add_global(rid, output))
        state.owner, state.synced = req, len(prompt) + len(output)
        return state

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
