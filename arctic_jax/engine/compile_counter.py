"""Counting XLA compilations (tests assert that serving compiles nothing)."""
from __future__ import annotations

from typing import Any

import jax


class CompileCounter:
    """Counts XLA backend compilations while ``active`` (for no-recompile checks)."""

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self.active = True
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def close(self) -> None:
        """Stop counting and unregister the listener."""
        self.active = False
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if self.active and event == self._EVENT:
            self.count += 1
