"""The registry's defaults keep every method at least at SGD's accuracy (a short run).

The recorded comparison (``benchmarks/README.md``: MNIST-1D, 3 seeds, 1000 steps) is the
evidence for the registry's defaults; this test keeps it true on a run the suite can
afford: MNIST-1D, one seed, 990 steps (one compiled chunk of 66 steps per method), every
registered method at its registry defaults. Shorter runs do not judge the defaults: at
300 steps SGD, the fastest to fit, leads the two-gradient methods by up to 7 points. A
method "clearly below" SGD trails it by more than :data:`MARGIN`; LookSAM at the paper's
alpha 0.7 and coupled WSAM at gamma 0.9 trail it by far more on this run (see
``test_the_check_catches_the_paper_values``).
"""

from __future__ import annotations

import pytest

from sam_optax import registry
from sam_optax.compare import run_compare

STEPS = 990
MARGIN = 0.02  # two points of test accuracy; a seed's spread here is about one


def _accuracies(methods):
    result = run_compare("mnist1d", methods, seeds=1, steps=STEPS, progress=False, timing=False)
    return {r["method"]: r["test_acc_mean"] for r in result.rows}


@pytest.mark.slow
def test_every_registry_method_at_its_defaults_is_not_below_sgd():
    acc = _accuracies(None)
    assert set(acc) == set(registry.METHODS)
    below = {m: round(100 * (a - acc["sgd"]), 1) for m, a in acc.items() if a < acc["sgd"] - MARGIN}
    assert not below, f"points below sgd ({100 * acc['sgd']:.1f} %) at the defaults: {below}"


@pytest.mark.slow
def test_the_check_catches_the_paper_values():
    acc = _accuracies(["looksam:alpha=0.7", "wsam_coupled:gamma=0.9"])
    assert acc["looksam:alpha=0.7"] < acc["sgd"] - MARGIN
    assert acc["wsam_coupled:gamma=0.9"] < acc["sgd"] - MARGIN
