"""Paired timing: every contender runs right after a turn of a reference.

Used by ``sam-optax compare`` and by the benchmark scripts. On a shared or small
machine a contender's time moves with what ran just before it and with the machine's
drift. Timing each turn of a contender right after a turn of the reference, and
taking the median over rounds of the ratio of the two, cancels both: every contender
starts after the same predecessor, and the two turns of a pair see the same machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol


class Runner(Protocol):
    """A contender: calling it runs ``steps`` training steps and blocks on the result."""

    label: str

    def __call__(self) -> None: ...


class Timing(NamedTuple):
    """What :func:`paired_times` measured for one runner.

    Attributes:
      seconds: the median time per step over the rounds.
      ratio: the median over rounds of the runner's turn time divided by the
        reference's turn time just before it (1.0 for the reference itself).
    """

    seconds: float
    ratio: float


def paired_times(
    reference: Runner, runners: Sequence[Runner], rounds: int, *, steps: int, warmup: int
) -> dict[str, Timing]:
    """Times every runner against ``reference``, each turn right after a turn of it.

    Every runner (the reference first) is called ``warmup`` times untimed. Then each
    round runs ``reference`` and one runner, for every runner in an order that rotates
    from round to round; with no runners, each round times the reference alone.

    Args:
      reference: the runner every ratio is relative to.
      runners: the other runners; their labels and the reference's are distinct.
      rounds: timed rounds.
      steps: the steps one call of a runner runs (the times are per step).
      warmup: untimed calls of each runner before the rounds.

    Returns:
      ``label -> Timing`` for the reference and every runner.
    """

    def timed(runner: Callable[[], None]) -> float:
        start = time.perf_counter()
        runner()
        return (time.perf_counter() - start) / steps

    for runner in [reference, *runners]:
        for _ in range(warmup):
            runner()
    base_times: list[float] = []
    samples: dict[str, list[float]] = {r.label: [] for r in runners}
    ratios: dict[str, list[float]] = {r.label: [] for r in runners}
    for i in range(rounds):
        if not runners:
            base_times.append(timed(reference))
        shift = i % max(len(runners), 1)
        for runner in [*runners[shift:], *runners[:shift]]:
            base = timed(reference)
            seconds = timed(runner)
            base_times.append(base)
            samples[runner.label].append(seconds)
            ratios[runner.label].append(seconds / base)
    out = {reference.label: Timing(statistics.median(base_times), 1.0)}
    for runner in runners:
        label = runner.label
        out[label] = Timing(statistics.median(samples[label]), statistics.median(ratios[label]))
    return out
