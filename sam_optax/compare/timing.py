"""The cost column of ``sam-optax compare``: each method timed right after ``sgd``.

After training, each method's compiled curve-point chunk runs, with the gradient
counter's host callbacks switched off, from the state its last seed ended in, right
after the baseline has run as many steps, in :data:`TIMING_ROUNDS` rounds whose order
rotates (:func:`sam_optax._timing.paired_times`). The time per step is the median over
rounds and the relative cost the median of the per-round ratios.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from sam_optax import _timing

TIMING_ROUNDS = 10


class TimedRun:
    """One method's compiled training chunk, run with the counter off, for the timing.

    Each call runs the chunk's steps over a fixed batch order from the state the
    last call left, and blocks on the result.
    """

    def __init__(self, label: str, compiled: Callable, state: Any, data: tuple) -> None:
        self.label, self._compiled, self._state, self._data = label, compiled, state, data

    def __call__(self) -> None:
        self._state, losses = self._compiled(self._state, *self._data)
        jax.block_until_ready(losses)


def time_runs(runs: Sequence[TimedRun], steps: int) -> dict[str, _timing.Timing]:
    """Times ``runs[1:]`` against ``runs[0]`` (the baseline), paired, per step."""
    return _timing.paired_times(runs[0], runs[1:], TIMING_ROUNDS, steps=steps, warmup=1)
