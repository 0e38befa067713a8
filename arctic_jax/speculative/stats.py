"""Counters of speculative decoding for ``/metrics`` and ``bench``.

One record per (request, step) that decoded:

- ``on_verified(num_drafted, num_accepted, num_emitted)`` for a request that was
  verified against drafts (a draft list of length 0 counts as a step with no drafts);
- ``on_plain_decode(num_steps)`` for request-steps that decoded one token without
  speculating, so ``mean_tokens_per_step`` compares like with like.

Draft position i (0-based) counts as drafted in a request-step with more than i
drafts (a draft tree: deeper than i), and as accepted when more than i drafts were accepted.
``acceptance_rate_by_position[i]`` is accepted / drafted at that position.
Ratios with a zero denominator are 0.0.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"SpeculationStats: {name} must be a non-negative integer, got {value!r}")


@dataclasses.dataclass
class SpeculationStats:
    """Running totals; merge several (replicas, steps) with ``merge``."""

    num_drafted: int = 0
    num_accepted: int = 0
    num_steps: int = 0            # (request, step) pairs that decoded, speculating or not
    num_emitted: int = 0          # tokens those request-steps returned
    drafted_by_position: list[int] = dataclasses.field(default_factory=list)
    accepted_by_position: list[int] = dataclasses.field(default_factory=list)

    def on_verified(self, num_drafted: int, num_accepted: int, num_emitted: int | None = None,
                    depth: int | None = None) -> None:
        """Record one request-step verified against ``num_drafted`` drafts.

        ``num_emitted`` defaults to ``num_accepted + 1``; pass fewer when a stop
        string, EOS or ``max_tokens`` cut the accepted run. ``depth``: the draft positions
        offered (a draft tree's depth; default ``num_drafted``, a path).
        """
        _check_count("num_drafted", num_drafted)
        _check_count("num_accepted", num_accepted)
        if num_accepted > num_drafted:
            raise ValueError(f"SpeculationStats: num_accepted={num_accepted} exceeds "
                             f"num_drafted={num_drafted}")
        if num_emitted is None:
            num_emitted = num_accepted + 1
        _check_count("num_emitted", num_emitted)
        if num_emitted > num_accepted + 1:
            raise ValueError(f"SpeculationStats: num_emitted={num_emitted} exceeds "
                             f"num_accepted + 1 = {num_accepted + 1}")
        if depth is None:
            depth = num_drafted
        _check_count("depth", depth)
        if not num_accepted <= depth <= num_drafted:
            raise ValueError(f"SpeculationStats: need num_accepted <= depth <= num_drafted, got "
                             f"{num_accepted}, {depth}, {num_drafted}")
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        self.num_steps += 1
        self.num_emitted += num_emitted
        _add_prefix(self.drafted_by_position, depth)
        _add_prefix(self.accepted_by_position, num_accepted)

    def on_plain_decode(self, num_steps: int = 1, num_emitted: int | None = None) -> None:
        """Record ``num_steps`` request-steps that decoded without drafts (one token each by default)."""
        _check_count("num_steps", num_steps)
        if num_emitted is None:
            num_emitted = num_steps
        _check_count("num_emitted", num_emitted)
        if num_emitted > num_steps:
            raise ValueError(f"SpeculationStats: num_emitted={num_emitted} exceeds "
                             f"num_steps={num_steps} for plain decode")
        self.num_steps += num_steps
        self.num_emitted += num_emitted

    @property
    def num_draft_steps(self) -> int:
        """Request-steps that carried at least one draft."""
        return self.drafted_by_position[0] if self.drafted_by_position else 0

    @property
    def acceptance_rate(self) -> float:
        return _ratio(self.num_accepted, self.num_drafted)

    @property
    def acceptance_rate_by_position(self) -> list[float]:
        return [_ratio(a, d) for a, d in zip(self._accepted_padded(), self.drafted_by_position, strict=True)]

    @property
    def mean_tokens_per_step(self) -> float:
        """Emitted tokens per request-step, plain decode steps included."""
        return _ratio(self.num_emitted, self.num_steps)

    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted drafts per drafting request-step (vLLM's "mean acceptance length")."""
        return 1.0 + _ratio(self.num_accepted, self.num_draft_steps) if self.num_draft_steps else 0.0

    def merge(self, other: SpeculationStats) -> SpeculationStats:
        """A new object holding the sums of ``self`` and ``other`` (neither is changed)."""
        out = SpeculationStats(
            num_drafted=self.num_drafted + other.num_drafted,
            num_accepted=self.num_accepted + other.num_accepted,
            num_steps=self.num_steps + other.num_steps,
            num_emitted=self.num_emitted + other.num_emitted,
        )
        out.drafted_by_position = _sum_lists(self.drafted_by_position, other.drafted_by_position)
        out.accepted_by_position = _sum_lists(self.accepted_by_position, other.accepted_by_position)
        return out

    def as_dict(self) -> dict[str, Any]:
        """Counts and derived rates, JSON-serialisable."""
        return {
            "num_drafted_tokens": self.num_drafted,
            "num_accepted_tokens": self.num_accepted,
            "num_steps": self.num_steps,
            "num_draft_steps": self.num_draft_steps,
            "num_emitted_tokens": self.num_emitted,
            "drafted_by_position": list(self.drafted_by_position),
            "accepted_by_position": self._accepted_padded(),
            "acceptance_rate": self.acceptance_rate,
            "acceptance_rate_by_position": self.acceptance_rate_by_position,
            "mean_tokens_per_step": self.mean_tokens_per_step,
            "mean_acceptance_length": self.mean_acceptance_length,
        }

    def _accepted_padded(self) -> list[int]:
        n = len(self.drafted_by_position)
        return list(self.accepted_by_position) + [0] * (n - len(self.accepted_by_position))


def _add_prefix(counts: list[int], n: int) -> None:
    """counts[i] += 1 for i < n, growing the list as needed."""
    if len(counts) < n:
        counts.extend([0] * (n - len(counts)))
    for i in range(n):
        counts[i] += 1


def _sum_lists(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
