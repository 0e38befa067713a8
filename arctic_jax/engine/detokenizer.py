"""Incremental detokenization with stop-string detection.

Decoding a growing token list from the start every step costs O(n^2); this
decodes only a short window: the text of ``ids[prefix:read]`` is compared with
that of ``ids[prefix:]`` and the difference is the new text. A window ending
in an incomplete UTF-8 sequence (U+FFFD) waits for more tokens.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""        # all decoded text (truncated at a stop string)
        self._emitted = 0     # chars of text already streamed
        self.stopped = False

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: Sequence[int]) -> None:
        """Append tokens; sets ``stopped`` when a stop string appears."""
        if self.stopped:
            return
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        search_from = max(0, len(self.text) - self._holdback)
        self.text += delta
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
                for other in self.stop:  # keep the earliest stop string
                    at2 = self.text.find(other)
                    if at2 >= 0:
                        self.text = self.text[:at2]
                break

    def flush(self) -> None:
        """At the end: keep text still waiting for more bytes of a character (as U+FFFD)."""
        if self.stopped or len(self._ids) == self._read:
            return
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before):
            self.text += after[len(before):]
        self._prefix = self._read = len(self._ids)

    def take(self, final: bool) -> str:
        """Text not yet streamed; holds back a possible stop-string prefix unless final."""
        if final:
            self.flush()
        end = len(self.text) if (final or self.stopped) else max(self._emitted,
                                                                 len(self.text) - self._holdback)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out
