"""The static options every model step function takes (hashable, so part of the compiled program)."""
from __future__ import annotations

import dataclasses

from arctic_jax.attention.strategy import AttentionStrategy, PagedAttention
from sharding.rules import ActivationSharding


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Compile-time choices of a step function."""

    attention: AttentionStrategy = PagedAttention()   # the route attention takes
    sharding: ActivationSharding | None = None        # None: one device, no constraints
