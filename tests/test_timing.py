"""Paired timing (``sam_optax._timing``), driven by a fake clock: no real timings."""

from __future__ import annotations

import pytest

from sam_optax import _timing

STEPS, WARMUP = 20, 2


@pytest.fixture
def machine(monkeypatch):
    """A fake clock that drifts: the machine slows down by 1 at each call of ``erm``.

    Returns ``(make, calls)``: ``make(label, cost)`` builds a runner whose call takes
    ``STEPS * cost * slowness``; ``calls`` lists the labels called, in order.
    """
    clock, calls = [0.0], []

    class Fake:
        def __init__(self, label, cost):
            self.label, self.cost = label, cost

        def __call__(self):
            calls.append(self.label)
            clock[0] += STEPS * self.cost * calls.count("erm")

    monkeypatch.setattr(_timing.time, "perf_counter", lambda: clock[0])
    return Fake, calls


def test_each_contender_runs_right_after_the_reference_and_ratios_cancel_drift(machine):
    """ERM costs 1, ``a`` 2 and ``b`` 3 times the current slowness, so the paired ratios
    are exactly 2 and 3 although every time per step moves."""
    make, calls = machine
    erm, a, b = make("erm", 1.0), make("a", 2.0), make("b", 3.0)
    times = _timing.paired_times(erm, [a, b], 3, steps=STEPS, warmup=WARMUP)
    assert calls[: 3 * WARMUP] == ["erm"] * WARMUP + ["a"] * WARMUP + ["b"] * WARMUP
    timed = calls[3 * WARMUP :]
    assert timed == ["erm", "a", "erm", "b", "erm", "b", "erm", "a", "erm", "a", "erm", "b"]
    # ERM's timed turns ran at slowness WARMUP + 1 .. WARMUP + 6.
    assert times["erm"] == (WARMUP + 3.5, 1.0)
    assert times["a"].ratio == 2.0 and times["b"].ratio == 3.0
    # ``a`` ran after ERM's 1st, 4th and 5th timed turns, ``b`` after the 2nd, 3rd, 6th.
    assert times["a"].seconds == 2.0 * (WARMUP + 4)
    assert times["b"].seconds == 3.0 * (WARMUP + 3)


def test_with_no_contender_the_reference_is_timed_alone(machine):
    make, calls = machine
    times = _timing.paired_times(make("erm", 1.5), [], 4, steps=STEPS, warmup=1)
    assert calls == ["erm"] * 5
    assert times == {"erm": (1.5 * 3.5, 1.0)}  # the median of slowness 2 .. 5
