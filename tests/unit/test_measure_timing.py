"""Timing statistics: warm-up excluded, spread recorded, unstable timings flagged (noisy clock)."""
from __future__ import annotations

import itertools
import random

import torch
import torch.nn.functional as F

from harness import measure
from harness.measure import StepTimer, TimingStats, time_interleaved_stats


def _inputs():
    scores = torch.randn(8, 5, requires_grad=True)
    return scores, torch.randint(5, (8,))


def _clock(step_fn):
    """A fake clock: each start/stop pair of calls measures step_fn(i) seconds."""
    now, calls = [0.0], itertools.count()

    def clock() -> float:
        i = next(calls)
        if i % 2:  # stop: advance by this pass's duration
            now[0] += step_fn(i // 2)
        return now[0]

    return clock


def test_steady_clock_is_reliable():
    stats = time_interleaved_stats([F.cross_entropy], [_inputs()], torch.device("cpu"), repeats=20, warmup=1,
                                   clock=_clock(lambda i: 0.002))
    (s,) = stats
    assert s.reliable and s.samples == 20 and abs(s.median_ms - 2.0) < 1e-9 and s.spread < 1e-9


def test_noisy_clock_is_flagged_unreliable():
    rng = random.Random(0)
    stats = time_interleaved_stats([F.cross_entropy], [_inputs()], torch.device("cpu"), repeats=30, warmup=1,
                                   clock=_clock(lambda i: 0.002 * rng.choice([1, 1, 5, 20])))
    (s,) = stats
    assert not s.reliable and "spread" in s.note and s.spread > measure.UNRELIABLE_SPREAD


def test_min_seconds_extends_the_rounds():
    (s,) = time_interleaved_stats([F.cross_entropy], [_inputs()], torch.device("cpu"), repeats=3, warmup=0,
                                  min_seconds=0.05, clock=_clock(lambda i: 0.001))
    assert s.samples == 50


def test_too_few_samples_are_unreliable():
    s = TimingStats.from_seconds([0.001, 0.001])
    assert not s.reliable and "only 2 samples" in s.note


def test_step_timer_cpu_uses_the_clock():
    ticks = iter([0.0, 0.01, 0.03, 0.06, 1.0, 1.5])
    timer = StepTimer(torch.device("cpu"), clock=lambda: next(ticks))
    timer.start()
    for _ in range(3):
        timer.lap()
    timer.start()  # a new epoch: the gap between epochs (evaluation) is not a step
    timer.lap()
    assert [round(t, 6) for t in timer.collect()] == [0.01, 0.02, 0.03, 0.5]
