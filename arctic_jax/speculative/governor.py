"""Speculation that stays on only while it pays, measured online (``adaptive_disable_batch_size``).

With many running requests a speculative step can cost more than it gains: the engine reads each
step before scheduling the next (drafts need the last token on the host), so the host work of
a step no longer overlaps the device's, and verify rows that are mostly rejected add device
work. Where that happens depends on the model, the card and the text, so it is measured, not
guessed: while more than ``batch_size`` requests run, the governor times windows of
``window`` decode steps with speculation on and with it off, and keeps the mode that emits more
tokens per second per running request (the other must beat it by ``margin``); every
``probe_every`` steps it measures the other mode again. Steps that prefill, and the step after
one (an overlapped step pays the previous step's device time), are not timed: a window compares
decoding alone, whatever the arrivals. Greedy and sampled output are the same either way
(verification is exact); only speed changes. At ``batch_size`` running requests or fewer it
never turns speculation off.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class GovernorConfig:
    """``batch_size``: governs while more requests run (0: never); ``window``: timed steps per
    measurement (the first step after a switch is not timed); ``probe_every``: steps between
    measurements of the mode not in use; ``margin``: how much faster the other mode must be to
    take over."""

    batch_size: int
    window: int = 16
    probe_every: int = 1024
    margin: float = 1.03

    def __post_init__(self) -> None:
        if self.batch_size < 0 or self.window < 2 or self.probe_every < self.window or self.margin < 1:
            raise ValueError(f"GovernorConfig: need batch_size >= 0, window >= 2, "
                             f"probe_every >= window and margin >= 1, got {self}")


class SpeculationGovernor:
    """Decides, step by step, whether the engine speculates (module docstring). Feed it every
    step's outcome with ``on_step``; read ``speculating`` before drafting."""

    def __init__(self, config: GovernorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self.speculating = True
        self.governed_steps = {True: 0, False: 0}   # steps above batch_size, by mode
        self.rates: dict[bool, float] = {}       # mode -> tokens / s / running request
        self._measured_at: dict[bool, int] = {}  # mode -> governed step count when last measured
        self._choice = True                      # the mode governed steps use outside probes
        self._probing = False                    # the current window measures the other mode
        self._last: float | None = None
        self._after_prefill = False
        self._skip = 1                           # steps not timed after a change of mode
        self._tokens = 0.0
        self._request_seconds = 0.0
        self._in_window = 0

    def on_step(self, emitted: int, running: int, prefill: bool = False) -> bool | None:
        """One engine step returned ``emitted`` tokens while ``running`` requests ran
        (``prefill``: it computed prompt tokens). Returns whether it speculated when the
        governor governed it (more than ``batch_size`` running), else None. Sets
        ``speculating`` for the next step."""
        now = self._clock()
        last, self._last = self._last, now
        after_prefill, self._after_prefill = self._after_prefill, prefill
        mode = self.speculating
        if not self.governs(running):
            self._probing = False                # a window cut short is measured again later
            self._restart()
            self._use(True)
            return None
        self.governed_steps[mode] += 1
        if self._skip or last is None or prefill or after_prefill:
            self._skip = max(self._skip - 1, 0)
        else:
            self._tokens += emitted
            self._request_seconds += (now - last) * running
            self._in_window += 1
            if self._in_window >= self.config.window:
                self._close_window(mode)
        self._use(self._choice != self._probing)
        return mode

    def governs(self, running: int) -> bool:
        """Whether a step with ``running`` requests is the governor's to decide."""
        return 0 < self.config.batch_size < running

    def as_dict(self) -> dict[str, float | int | None]:
        """Steps above ``batch_size`` with speculation on and off, and the last rates measured
        (tokens / s / running request; None before a measurement)."""
        return {"batch_size": self.config.batch_size,
                "steps_speculating": self.governed_steps[True],
                "steps_not_speculating": self.governed_steps[False],
                "rate_speculating": self.rates.get(True), "rate_not_speculating": self.rates.get(False)}

    def _close_window(self, mode: bool) -> None:
        """Record the window's rate. A probe's mode takes over only if it beat the chosen mode by
        ``margin``; the chosen mode probes the other when that one was never measured or not for
        ``probe_every`` governed steps."""
        steps = self.governed_steps[True] + self.governed_steps[False]
        self.rates[mode] = self._tokens / self._request_seconds if self._request_seconds > 0 else 0.0
        self._measured_at[mode] = steps
        self._restart()
        if self._probing:
            self._probing = False
            if self.rates[mode] > self.rates.get(self._choice, 0.0) * self.config.margin:
                self._choice = mode
            return
        other = not mode
        if steps - self._measured_at.get(other, -self.config.probe_every) >= self.config.probe_every:
            self._probing = True

    def _use(self, mode: bool) -> None:
        if mode != self.speculating:
            self.speculating = mode
            self._skip = 1

    def _restart(self) -> None:
        self._tokens = 0.0
        self._request_seconds = 0.0
        self._in_window = 0
