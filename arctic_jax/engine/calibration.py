"""Shift-parallel threshold calibration: time both variants per token bucket and put the
threshold at the crossover."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

Row = tuple[int, float, float]   # (token bucket, TP seconds, SP seconds)


def time_variants(run: Callable[[str, int], object], token_buckets: Sequence[int],
                  repeats: int = 5, clock: Callable[[], float] | None = None) -> list[Row]:
    """Median seconds of ``run(variant, T).block_until_ready()`` for "tp" and "sp" per bucket
    (``clock`` None: ``time.perf_counter``)."""
    clock = clock or time.perf_counter
    rows = []
    for T in token_buckets:
        times = {}
        for variant in ("tp", "sp"):
            samples = []
            for _ in range(repeats):
                t0 = clock()
                run(variant, T).block_until_ready()
                samples.append(clock() - t0)
            times[variant] = float(np.median(samples))
        rows.append((T, times["tp"], times["sp"]))
    return rows


def crossover_threshold(rows: Sequence[Row], token_buckets: Sequence[int]) -> int:
    """The largest bucket up to which TP is at least as fast as SP (the largest bucket if SP
    never wins; 0 if SP wins from the smallest)."""
    for T, tp, sp in rows:
        if sp < tp:
            smaller = [b for b in token_buckets if b < T]
            return smaller[-1] if smaller else 0
    return token_buckets[-1]


def log_calibration(rows: Sequence[Row], threshold: int) -> None:
    table = "\n".join(f"  {T:>6} tokens: tp {tp * 1e3:8.2f} ms  sp {sp * 1e3:8.2f} ms"
                      for T, tp, sp in rows)
    log.warning("shift-parallel calibration (bucket, TP, SP step times):\n%s\n"
                "threshold set to %d tokens", table, threshold)
