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
(``native_tree.NativeSuffixTree``; the same drafts at a fraction of the host cost), "python"
in ``suffix_tree.SuffixTree``, "auto" (default) the compiled one when it is installed.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from arctic_jax.speculative.native_tree import NativeSuffixTree, native_suffix_tree_class
from arctic_jax.speculative.suffix_tree import Draft, SuffixTree, as_draft, check_int, check_real

if TYPE_CHECKING:
    from arctic_jax.speculative.proposer import ProposerRequest

_LOCAL = 0   # the one sequence id of a per-request tree
BACKENDS = ("auto", "native", "python")   # auto: the compiled tree when installed


class _RequestState:
    __slots__ = ("tree", "tokens", "prompt_len", "global_key")

    def __init__(self, tree: SuffixTree, prompt_len: int, global_key: int | None) -> None:
        self.tree = tree
        self.tokens = tree.tokens_view(_LOCAL)   # its stored prompt + output (no copy)
        self.prompt_len = prompt_len
        self.global_key = global_key   # its response's sequence in the global tree (None = not cached)


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
        native = native_suffix_tree_class() is not None
        if backend == "native" and not native:
            raise ValueError("SuffixProposer: backend 'native' needs the compiled suffix tree "
                             "(pip install ./native)")
        self.backend = "native" if backend == "native" or (backend == "auto" and native) else "python"
        self._tree_class = NativeSuffixTree if self.backend == "native" else SuffixTree
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
        k = check_int("SuffixProposer.propose: k", k, 0)
        states = [self._sync(req) for req in requests]   # all first: the global tree sees every response
        glob = self._global if self._global is not None and len(self._global) else None
        args = (k, self.max_spec_factor, self.max_spec_offset, self.min_token_prob, self.use_tree_spec)
        depth = self.max_depth
        out = []
        for state in states:
            # the context is the last max_depth stored tokens: the local tree's active suffixes
            tokens = state.tokens
            n = min(len(tokens), depth)
            best = state.tree.speculate_stored(tokens, n, _LOCAL, *args, -1.0)
            if glob is not None:   # the global draft only when it scores higher (ties to local)
                other = glob.speculate_stored(tokens, n, state.global_key, *args,
                                              0.0 if best is None else best[3])
                if other is not None:
                    best = other
            out.append(Draft() if best is None else as_draft(best))
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
    def _sync(self, req: ProposerRequest) -> _RequestState:
        rid, prompt, output = req.request_id, req.prompt_ids, req.output_ids
        n_prompt, expected = len(prompt), len(prompt) + len(output)
        state = self._requests.get(rid)
        if state is not None:
            have = len(state.tokens)
            if (state.prompt_len == n_prompt and have <= expected
                    and _agrees(prompt, output, state.tokens, max(0, have - self.max_depth))):
                if have < expected:
                    state.tree.extend(_LOCAL, _concat_from(prompt, output, have))
                self._sync_global(state, output)
                return state
            self._drop_global(state)
        tree = self._tree_class(self.max_depth)
        tree.extend(_LOCAL, _concat_from(prompt, output, 0))
        state = self._requests[rid] = _RequestState(tree, n_prompt, self._add_global(rid, output))
        return state

    def _sync_global(self, state: _RequestState, output: Sequence[int]) -> None:
        key = state.global_key
        if key is None or self._global is None:
            return
        stored = self._global.tokens_view(key)
        have = len(stored)
        if have <= len(output) and _agrees((), output, stored, max(0, have - self.max_depth)):
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
