"""Errors raised while reading model checkpoints.

``CheckpointError`` covers files that are missing, unreadable, truncated or
whose tensors do not match the config. A config that arctic-jax cannot serve
(unknown architecture, unsupported rope type) raises
``arctic_jax.config.ConfigError`` instead, re-exported here for convenience.
"""
from __future__ import annotations

from collections.abc import Iterable

from arctic_jax.config import ConfigError

__all__ = ["CheckpointError", "ConfigError", "tensor_mismatch_error"]


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be loaded as it is."""


def tensor_mismatch_error(where: str, *, missing: Iterable[str] = (),
                          unexpected: Iterable[str] = (),
                          misshaped: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
                          other: Iterable[str] = ()) -> CheckpointError | None:
    """One error listing every problem with a checkpoint's tensors, or None if there are none.

    ``misshaped`` holds ``(name, expected_shape, found_shape)``.
    """
    missing, unexpected, misshaped, other = (sorted(missing), sorted(unexpected),
                                             list(misshaped), list(other))
    if not (missing or unexpected or misshaped or other):
        return None
    lines = [f"{where} does not match its config:"]
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    for name, expected, found in misshaped:
        lines.append(f"  tensor {name}: expected shape {tuple(expected)}, found {tuple(found)}")
    lines.extend(f"  {line}" for line in other)
    return CheckpointError("\n".join(lines))
