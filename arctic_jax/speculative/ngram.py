"""n-gram prompt lookup (vLLM's ``method: "ngram"``): draft tokens copied from earlier context.

The context is a request's prompt followed by its output. For n from
``prompt_lookup_max`` down to ``prompt_lookup_min`` (only n < len(context)), the
proposer looks for the latest earlier occurrence of the context's last n tokens,
i.e. the largest start i < len - n with context[i:i+n] == context[-n:], and
proposes the up to k tokens that followed it, context[i+n : i+n+k]. The first n
that matches wins; no match gives an empty draft.

Per request the proposer keeps the context as a growing int32 numpy buffer, fed
by ``on_tokens`` and built from ``prompt_ids + output_ids`` on first sight. The
request's ``prompt_ids + output_ids`` stay the source of truth: before each
search the buffer is checked against the request's length and last
``prompt_lookup_max`` tokens, topped up from ``output_ids`` when it is behind,
and rebuilt when it disagrees (tokens fed twice after a preemption, a reused
request id). Drafts only affect speed, since verification is exact.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from arctic_jax.speculative.proposer import ProposerRequest

_EMPTY = np.zeros(0, np.int32)


class _Context:
    """A growing int32 token buffer: ``tokens[:length]`` is the known context."""

    __slots__ = ("tokens", "length")

    def __init__(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=np.int32).reshape(-1)
        self.tokens = np.empty(max(64, 2 * arr.size), np.int32)
        self.tokens[:arr.size] = arr
        self.length = arr.size

    def extend(self, ids: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=np.int32).reshape(-1)
        end = self.length + arr.size
        if end > self.tokens.size:
            grown = np.empty(max(end, 2 * self.tokens.size), np.int32)
            grown[:self.length] = self.tokens[:self.length]
            self.tokens = grown
        self.tokens[self.length:end] = arr
        self.length = end

    def view(self) -> np.ndarray:
        return self.tokens[:self.length]


def find_ngram_draft(context: np.ndarray, k: int, min_n: int, max_n: int) -> np.ndarray:
    """Draft for one context [L] (int array): up to k tokens following the latest earlier
    occurrence of the longest matching suffix n-gram, n in [min_n, max_n] and n < L.

    Vectorised over candidate positions: ``run[j]`` says whether the n tokens
    ending at j equal the context's last n tokens, refined one n at a time.
    """
    L = int(context.shape[0])
    max_n = min(max_n, L - 1)
    if k <= 0 or max_n < min_n or max_n < 1:
        return _EMPTY
    body = context[:L - 1]  # candidate end positions j = 0 .. L-2 of an earlier occurrence
    run = body == context[L - 1]
    best_j = -1
    for n in range(1, max_n + 1):
        if n > 1:
            # extend the match one token to the left: context[j-n+1] == context[L-n]
            run[:n - 1] = False
            run[n - 1:] &= context[:L - n] == context[L - n]
        if n >= min_n:
            last = (L - 2) - int(np.argmax(run[::-1]))
            if not run[last]:
                break
            best_j = last
        elif not run.any():
            break
    if best_j < 0:
        return _EMPTY
    return context[best_j + 1:best_j + 1 + k]


class NgramProposer:
    """Prompt-lookup proposer; see the module docstring. Not thread-safe."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        for name, v in (("prompt_lookup_min", prompt_lookup_min), ("prompt_lookup_max", prompt_lookup_max)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NgramProposer: {name} must be an integer >= 1, got {v!r}")
        if prompt_lookup_min > prompt_lookup_max:
            raise ValueError(f"NgramProposer: prompt_lookup_min={prompt_lookup_min} must be <= "
                             f"prompt_lookup_max={prompt_lookup_max}")
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        self._contexts: dict[str, _Context] = {}

    @property
    def num_tracked(self) -> int:
        """Requests whose context buffer is held (for leak checks)."""
        return len(self._contexts)

    def propose(self, requests: Sequence[ProposerRequest], k: int) -> list[list[int]]:
        """One draft (0..k token ids) per request, in order."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"NgramProposer.propose: k must be a non-negative integer, got {k!r}")
        out = []
        for req in requests:
            ctx = self._synced_context(req)
            draft = find_ngram_draft(ctx.view(), k, self.prompt_lookup_min, self.prompt_lookup_max)
            out.append(draft.tolist())
        return out

    def on_tokens(self, request: ProposerRequest, new_tokens: Sequence[int]) -> None:
        """Append tokens the request has just accepted (ignored for a request not yet seen)."""
        ctx = self._contexts.get(request.request_id)
        if ctx is not None and len(new_tokens):
            ctx.extend(new_tokens)

    def on_finish(self, request: ProposerRequest) -> None:
        """Drop the request's state (a no-op when there is none)."""
        self._contexts.pop(request.request_id, None)

    def _synced_context(self, req: ProposerRequest) -> _Context:
        """The request's buffer, made equal to prompt_ids + output_ids (cheaply checked)."""
        prompt, output = req.prompt_ids, req.output_ids
        n_prompt, expected = len(prompt), len(prompt) + len(output)
        ctx = self._contexts.get(req.request_id)
        if ctx is not None and n_prompt <= ctx.length < expected:
            ctx.extend(output[ctx.length - n_prompt:])
        if ctx is None or ctx.length != expected or not self._tail_matches(ctx, prompt, output):
            ctx = _Context(list(prompt) + list(output))
            self._contexts[req.request_id] = ctx
        return ctx

    def _tail_matches(self, ctx: _Context, prompt: Sequence[int], output: Sequence[int]) -> bool:
        m = min(ctx.length, self.prompt_lookup_max)
        if m == 0:
            return True
        n_out = min(m, len(output))
        tail = list(prompt[len(prompt) - (m - n_out):]) if m > n_out else []
        tail += list(output[len(output) - n_out:])
        return ctx.tokens[ctx.length - m:ctx.length].tolist() == tail
