"""The speculation governor (``adaptive_disable_batch_size``): windows of steps timed in each mode,
the faster kept, the other re-measured every ``probe_every`` steps, never governing at or below
its batch size; and its config key."""
from __future__ import annotations

import pytest

from arctic_jax.speculative.config import SpeculativeConfig
from arctic_jax.speculative.governor import GovernorConfig, SpeculationGovernor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(governor: SpeculationGovernor, clock: Clock, steps: int, running: int,
          seconds: dict[bool, float], tokens: dict[bool, int]) -> list[bool]:
    """Run ``steps`` steps whose duration and emitted tokens depend on the mode the governor chose
    for them; returns the modes."""
    modes = []
    for _ in range(steps):
        mode = governor.speculating
        modes.append(mode)
        clock.now += seconds[mode]
        governor.on_step(tokens[mode] * running, running)
    return modes


def test_keeps_plain_decoding_when_speculation_is_slower_and_probes_it_again():
    clock = Clock()
    gov = SpeculationGovernor(GovernorConfig(batch_size=4, window=8, probe_every=64), clock)
    # speculation: 1.2 tokens per request per 10 ms step; plain: 1 token per 6 ms step
    modes = drive(gov, clock, 200, running=16, seconds={True: 0.010, False: 0.006},
                  tokens={True: 1.2, False: 1})
    assert modes[:9] == [True] * 9                  # the first window (+1 step before timing)
    assert gov.rates[False] > gov.rates[True]
    tail = modes[40:]
    assert tail.count(True) < len(tail) // 5        # plain decoding from then on ...
    assert True in tail                             # ... with speculation re-measured
    assert gov.rates[True] == pytest.approx(120, rel=1e-6)   # 1.2 tokens / 10 ms
    assert gov.rates[False] == pytest.approx(1 / 0.006, rel=1e-6)


def test_keeps_speculating_when_it_pays():
    clock = Clock()
    gov = SpeculationGovernor(GovernorConfig(batch_size=4, window=8, probe_every=64), clock)
    modes = drive(gov, clock, 200, running=16, seconds={True: 0.010, False: 0.006},
                  tokens={True: 2.5, False: 1})
    assert gov.rates[True] > gov.rates[False]
    assert modes[40:].count(False) < len(modes[40:]) // 5


def test_never_governs_at_or_below_its_batch_size_or_when_off():
    for batch_size, running in ((8, 8), (8, 3), (0, 64)):
        clock = Clock()
        gov = SpeculationGovernor(GovernorConfig(batch_size=batch_size, window=4, probe_every=8),
                                  clock)
        modes = drive(gov, clock, 100, running=running, seconds={True: 1.0, False: 0.001},
                      tokens={True: 1, False: 1})
        assert all(modes) and not gov.rates
    # off again once the batch shrinks: speculation comes back at once
    clock = Clock()
    gov = SpeculationGovernor(GovernorConfig(batch_size=2, window=4, probe_every=64), clock)
    drive(gov, clock, 30, running=8, seconds={True: 1.0, False: 0.01}, tokens={True: 1, False: 1})
    assert not gov.speculating
    drive(gov, clock, 1, running=2, seconds={True: 1.0, False: 0.01}, tokens={True: 1, False: 1})
    assert gov.speculating


def test_config_key_and_bad_values():
    assert SpeculativeConfig("ngram", 4).adaptive_disable_batch_size == 32
    assert SpeculativeConfig("suffix", adaptive_disable_batch_size=0).adaptive_disable_batch_size == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="adaptive_disable_batch_size"):
            SpeculativeConfig("ngram", 4, adaptive_disable_batch_size=bad)
    with pytest.raises(ValueError, match="GovernorConfig"):
        GovernorConfig(batch_size=4, window=8, probe_every=4)


def test_choice_survives_a_dip_below_the_batch_size_and_prefill_steps_are_not_timed():
    clock = Clock()
    gov = SpeculationGovernor(GovernorConfig(batch_size=4, window=8, probe_every=512), clock)
    slow_spec = {True: 0.010, False: 0.006}
    drive(gov, clock, 40, running=16, seconds=slow_spec, tokens={True: 1, False: 1})
    assert gov.speculating is False and set(gov.rates) == {True, False}
    drive(gov, clock, 3, running=4, seconds=slow_spec, tokens={True: 1, False: 1})
    assert gov.speculating is True                 # not governed: speculation on
    modes = drive(gov, clock, 30, running=16, seconds=slow_spec, tokens={True: 1, False: 1})
    assert not any(modes[1:])                      # back to the choice, no new probe
    # steps with prefill (and the step after each) are not timed: a slow prefill step in every
    # other step leaves the measured rates those of the decode steps
    gov = SpeculationGovernor(GovernorConfig(batch_size=4, window=8, probe_every=512), clock)
    for i in range(200):
        mode = gov.speculating
        prefill = i % 3 == 0
        clock.now += 1.0 if prefill else (0.010 if mode else 0.006)
        gov.on_step(16, 16, prefill=prefill)
    assert gov.rates[True] == pytest.approx(100.0) and gov.rates[False] == pytest.approx(1 / 0.006)


def test_a_probe_takes_over_only_by_the_margin():
    clock = Clock()
    gov = SpeculationGovernor(GovernorConfig(batch_size=1, window=4, probe_every=512, margin=1.05), clock)
    drive(gov, clock, 20, running=8, seconds={True: 0.0100, False: 0.0098}, tokens={True: 1, False: 1})
    assert gov.rates[False] > gov.rates[True] and gov.speculating   # 2% faster: not enough
    gov = SpeculationGovernor(GovernorConfig(batch_size=1, window=4, probe_every=512, margin=1.05), clock)
    drive(gov, clock, 20, running=8, seconds={True: 0.0100, False: 0.0090}, tokens={True: 1, False: 1})
    assert not gov.speculating                                      # 11% faster: takes over
