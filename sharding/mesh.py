"""The device mesh of a parallel deployment."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from arctic_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """SP x TP = P devices. ``mode``: "tp" (always TP over P), "sp" (always Ulysses SP x TP),
    or "shift" (TP for steps of at most ``shift_threshold`` tokens, SP above)."""

    sequence_parallel_size: int = 1
    tensor_parallel_size: int = 1
    mode: str = "tp"
    shift_threshold: int | str = 512   # tokens, or "auto" to calibrate at warm-up

    def __post_init__(self) -> None:
        if self.sequence_parallel_size < 1 or self.tensor_parallel_size < 1:
            raise ConfigError("sequence and tensor parallel sizes must be >= 1")
        if self.mode not in ("tp", "sp", "shift"):
            raise ConfigError(f"parallel mode must be tp, sp or shift, got {self.mode!r}")
        if self.mode != "tp" and self.sequence_parallel_size == 1 and self.num_devices > 1:
            raise ConfigError(f"parallel mode {self.mode!r} needs sequence_parallel_size > 1")
        if isinstance(self.shift_threshold, str):
            if self.shift_threshold != "auto":
                raise ConfigError(f"shift threshold must be a token count or 'auto', got "
                                  f"{self.shift_threshold!r}")
        elif self.shift_threshold < 1:
            raise ConfigError(f"shift threshold must be >= 1, got {self.shift_threshold}")

    @property
    def num_devices(self) -> int:
        return self.sequence_parallel_size * self.tensor_parallel_size

    @property
    def variants(self) -> tuple[str, ...]:
        """The step variants this deployment compiles."""
        return {"tp": ("tp",), "sp": ("sp",), "shift": ("tp", "sp")}[self.mode]


def make_mesh(pc: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (sp, tp) mesh over the first SP x TP devices; device (s, t) has rank s * TP + t."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < pc.num_devices:
        raise ConfigError(f"SP {pc.sequence_parallel_size} x TP {pc.tensor_parallel_size} = "
                          f"{pc.num_devices} devices requested, but only {len(devices)} are visible")
    grid = np.asarray(devices[:pc.num_devices], dtype=object).reshape(
        pc.sequence_parallel_size, pc.tensor_parallel_size)
    return Mesh(grid, ("sp", "tp"), axis_types=(AxisType.Auto, AxisType.Auto))


def resolve_parallel_config(tensor_parallel_size: int = 1, sequence_parallel_size: int = 1,
                            enable_shift_parallel: bool = False,
                            shift_parallel_threshold: int | str = 512,
                            parallel_mode: str | None = None) -> ParallelConfig | None:
    """User-facing flags -> ParallelConfig (None for one device).

    ``parallel_mode`` tp/sp/shift is a shortcut; without it, shift needs
    ``enable_shift_parallel`` and SP > 1 alone means static Ulysses SP.
    """
    if isinstance(shift_parallel_threshold, str) and shift_parallel_threshold != "auto":
        try:
            shift_parallel_threshold = int(shift_parallel_threshold)
        except ValueError:
            raise ConfigError(f"--shift-parallel-threshold must be a number or 'auto', got "
                              f"{shift_parallel_threshold!r}") from None
    if tensor_parallel_size * sequence_parallel_size == 1:
        if parallel_mode not in (None, "tp") or enable_shift_parallel:
            raise ConfigError("shift/sp parallel modes need more than one device "
                              "(set --sequence-parallel-size)")
        return None
    mode = parallel_mode or ("shift" if enable_shift_parallel
                             else "sp" if sequence_parallel_size > 1 else "tp")
    return ParallelConfig(sequence_parallel_size=sequence_parallel_size,
                          tensor_parallel_size=tensor_parallel_size, mode=mode,
                          shift_threshold=shift_parallel_threshold)
