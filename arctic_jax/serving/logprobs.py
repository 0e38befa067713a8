"""Logprobs in the OpenAI completions (legacy) and chat formats."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arctic_jax.serving.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class TokenTexts:
    """Text of single tokens for logprobs (special tokens shown), memoised per token id."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def completion_logprobs(texts: TokenTexts, ids: Sequence[int], lps: Sequence[float],
                         tops: Sequence[Sequence[tuple[int, float]]], offset: int
                         ) -> tuple[CompletionLogprobs, int]:
    """Legacy logprobs of ``ids``; offsets count from ``offset``. Returns it and the next offset."""
    out = CompletionLogprobs()
    for k, (tid, lp) in enumerate(zip(ids, lps, strict=True)):
        token = texts(tid)
        top = {texts(t): float(v) for t, v in (tops[k] if k < len(tops) else ())}
        top.setdefault(token, float(lp))  # the chosen token is always listed
        out.tokens.append(token)
        out.token_logprobs.append(float(lp))
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out, offset


def chat_logprobs(texts: TokenTexts, ids: Sequence[int], lps: Sequence[float],
                   tops: Sequence[Sequence[tuple[int, float]]]) -> ChatLogprobs:
    content = []
    for k, (tid, lp) in enumerate(zip(ids, lps, strict=True)):
        token = texts(tid)
        top = [TopLogprob(token=texts(t), logprob=float(v), bytes=list(texts(t).encode()))
               for t, v in (tops[k] if k < len(tops) else ())]
        content.append(TokenLogprob(token=token, logprob=float(lp), bytes=list(token.encode()),
                                    top_logprobs=top))
    return ChatLogprobs(content=content)
