"""Friendly SAM against docs/methods/geometry.md in NumPy float64, over five steps of its EMA."""

from __future__ import annotations

import chex
import optax
import pytest
from geometry_reference import (
    LR,
    assert_close,
    normalized,
    np_grad,
    reference_trajectory,
    run,
    to_np,
    trajectory,
)

import sam_optax


def _friendly_direction(rho, sigma, lmbda):
    state = {}

    def direction(ws, g, t):
        if t == 0:
            state["m"], d = g, g
        else:
            m = state["m"]
            d = [x - sigma * mo for x, mo in zip(g, m, strict=True)]
            state["m"] = [lmbda * mo + (1 - lmbda) * x for mo, x in zip(m, g, strict=True)]
        return np_grad([w + e for w, e in zip(ws, normalized(d, rho), strict=True)])

    return direction, state


def test_five_steps_match_numpy():
    direction, ema = _friendly_direction(0.1, 0.8, 0.6)
    theirs = reference_trajectory(direction, 5)
    tx = optax.chain(sam_optax.friendly_sam(rho=0.1, sigma=0.8, lmbda=0.6), optax.sgd(LR))
    ours, state = run(tx, 5)
    assert_close(ours, theirs)
    assert_close([to_np(state[0].perturbation.m)], [ema["m"]])
    assert int(state[0].perturbation.count) == 5


def test_sigma_zero_is_sam():
    ours = trajectory(optax.chain(sam_optax.friendly_sam(rho=0.1, sigma=0.0), optax.sgd(LR)), 4)
    sam = trajectory(optax.chain(sam_optax.sam(rho=0.1), optax.sgd(LR)), 4)
    chex.assert_trees_all_equal(ours, sam)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": -0.5}, r"`sigma` must lie in \[0.0, inf\], got -0.5"),
        ({"lmbda": 1.0}, r"`lmbda` must lie in \[0.0, 1.0\), got 1.0"),
        ({"lmbda": -0.1}, r"`lmbda` must lie in \[0.0, 1.0\), got -0.1"),
        ({"rho": -0.1}, r"`rho` must lie in \[0.0, inf\], got -0.1"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.friendly_sam(**kwargs)
