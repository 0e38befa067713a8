"""Unpacking a step's packed device result on the host."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class StepResult:
    """Host copy of a step's sampled tokens, one row per logits row (chunk order)."""

    tokens: np.ndarray                # [n] int32
    logprobs: np.ndarray              # [n] float32
    top_logprobs: Sequence[list[tuple[int, float]]] | None   # TopLogprobRows
    accepted: np.ndarray | None = None   # [n] bool: the row accepted its draft (verify steps)
    drafts: np.ndarray | None = None     # [n, k] int32: row e holds sampled chunk e's model draft


class TopLogprobRows(Sequence):
    """Each row's top (token id, logprob) pairs, built as a row is read: most rows belong to
    requests that asked for no logprobs, and a step has up to R of them."""

    def __init__(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        self._ids = ids            # [n, k] int32
        self._logprobs = logprobs  # [n, k] float32

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        return list(zip(self._ids[r].tolist(), self._logprobs[r].tolist(), strict=True))


def fetch_result(packed: jax.Array, num_rows: int, num_top_logprobs: int,
                 verify: bool = False, num_drafts: int = 0) -> StepResult:
    """Wait for a step's packed int32 result [R, 2 + 2 * num_top (+ 1 accepted flag when
    ``verify``) (+ ``num_drafts`` draft-model tokens)] and copy its first ``num_rows`` rows to
    the host (one transfer)."""
    host = np.asarray(jax.device_get(packed))[:num_rows]
    tokens = host[:, 0].copy()
    logprobs = host[:, 1].view(np.float32).copy()
    top = None
    n = num_top_logprobs
    if n:
        top = TopLogprobRows(host[:, 2:2 + n].copy(), host[:, 2 + n:2 + 2 * n].view(np.float32).copy())
    accepted = host[:, 2 + 2 * n].astype(bool) if verify else None
    drafts = host[:, host.shape[1] - num_drafts:].copy() if num_drafts else None
    return StepResult(tokens=tokens, logprobs=logprobs, top_logprobs=top, accepted=accepted,
                      drafts=drafts)
