"""Compile the rarely needed step programs after the server is ready (CPU start-up).

On a CPU a program takes seconds to compile, and a server has dozens (token buckets x
page-table buckets). ``BackgroundCompiler`` compiles the programs of the larger token buckets
in a daemon thread, smallest bucket first, while the engine serves with the ones compiled
before it reported ready. ``ready_tokens`` is the largest token bucket whose programs (and
every smaller bucket's) are all compiled: the engine caps its scheduler's token budget there,
so a step never needs a program that is still compiling. Requests wait in the scheduler (a
long prompt is prefilled in smaller chunks meanwhile), never inside a step.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class BackgroundCompiler:
    """Compiles ``units`` (grouped by token bucket) with ``compile_unit`` in a daemon thread.

    ``token_of(unit)`` is the token bucket a unit belongs to; ``ready_from`` the largest
    bucket already compiled when the thread starts. ``on_done(seconds, error)`` is called
    once from the thread at the end.
    """

    def __init__(self, units: Sequence[Any], compile_unit: Callable[[Any], None],
                 token_of: Callable[[Any], int], ready_from: int,
                 on_done: Callable[[float, BaseException | None], None] | None = None):
        self._by_bucket: dict[int, list[Any]] = {}
        for unit in units:
            self._by_bucket.setdefault(token_of(unit), []).append(unit)
        self._compile_unit = compile_unit
        self._ready = ready_from
        self._on_done = on_done
        self.total = len(units)
        self.compiled = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="arctic-jax-compile", daemon=True)

    @property
    def ready_tokens(self) -> int:
        """The largest token bucket every step may use now."""
        return self._ready

    @property
    def pending(self) -> int:
        """Programs not compiled yet."""
        return self.total - self.compiled

    @property
    def done(self) -> bool:
        return not self._thread.is_alive() and self.pending == 0

    def start(self) -> BackgroundCompiler:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self, timeout: float = 120.0) -> None:
        """Compile nothing more and wait for the program being compiled (a process must not
        exit while XLA compiles in a thread: it would abort)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _work(self) -> None:
        start = time.perf_counter()
        try:
            for bucket in sorted(self._by_bucket):
                for unit in self._by_bucket[bucket]:
                    if self._stop.is_set():
                        return
                    self._compile_unit(unit)
                    self.compiled += 1
                self._ready = max(self._ready, bucket)
                log.info("steps of up to %d tokens compiled (%d programs left)", bucket,
                         self.pending)
        except BaseException as e:  # reported; the engine keeps its current cap
            self.error = e
            log.error("background compilation failed; steps stay at %d tokens: %r",
                      self._ready, e)
        if self._on_done is not None:
            self._on_done(time.perf_counter() - start, self.error)
