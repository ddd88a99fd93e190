"""VaSSO against docs/methods/geometry.md in NumPy float64, over five steps of its EMA."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from geometry_reference import (
    LR,
    assert_close,
    loss,
    make_params,
    normalized,
    np_grad,
    reference_trajectory,
    run,
    to_np,
    trajectory,
)

import sam_optax


def _vasso_direction(rho, theta):
    state = {}

    def direction(ws, g, t):
        if t == 0:
            state["d"] = g
        else:
            state["d"] = [(1 - theta) * d + theta * x for d, x in zip(state["d"], g, strict=True)]
        return np_grad([w + e for w, e in zip(ws, normalized(state["d"], rho), strict=True)])

    return direction, state


def test_five_steps_match_numpy():
    direction, ema = _vasso_direction(0.1, 0.4)
    theirs = reference_trajectory(direction, 5)
    ours, state = run(optax.chain(sam_optax.vasso(rho=0.1, theta=0.4), optax.sgd(LR)), 5)
    assert_close(ours, theirs)
    assert_close([to_np(state[0].perturbation.d)], [ema["d"]])
    assert int(state[0].perturbation.count) == 5


def test_theta_one_is_sam():
    ours = trajectory(optax.chain(sam_optax.vasso(rho=0.1, theta=1.0), optax.sgd(LR)), 4)
    sam = trajectory(optax.chain(sam_optax.sam(rho=0.1), optax.sgd(LR)), 4)
    chex.assert_trees_all_equal(ours, sam)


def test_ema_starts_at_the_first_probe():
    """With rho = 0 on step 0 (no probe), the first probe still sets d = g."""
    rho = lambda t: jnp.where(t == 0, 0.0, 0.1)  # noqa: E731
    tx = sam_optax.vasso(rho=rho, theta=0.3)
    params = make_params()
    grad_fn = jax.grad(loss)
    update = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=grad_fn)[1])
    state = update(grad_fn(params), tx.init(params))
    assert int(state.perturbation.count) == 0
    g1 = {k: v * 2.0 for k, v in grad_fn(params).items()}
    state = update(g1, state)
    chex.assert_trees_all_equal(state.perturbation.d, g1)


def test_state_is_float32_for_bf16_params():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params())
    state = sam_optax.vasso().init(params)
    assert {x.dtype for x in jax.tree.leaves(state.perturbation.d)} == {np.dtype("float32")}


@pytest.mark.parametrize("theta", [0.0, -0.5, 1.5])
def test_theta_outside_half_open_interval_is_rejected(theta):
    with pytest.raises(ValueError, match=r"`theta` must lie in \(0.0, 1.0\], got"):
        sam_optax.vasso(theta=theta)
