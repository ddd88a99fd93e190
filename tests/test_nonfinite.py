"""Non-finite input: NaN and Inf propagate, and ``optax.apply_if_finite`` skips the step.

A sharpness-aware transformation never replaces a non-finite gradient with something
finite: a NaN or Inf in the clean gradient, or one that the probe gradient brings back
from ``w + e``, reaches the output, where the user's loss checks or
``optax.apply_if_finite`` see it. Wrapped around the whole chain, ``apply_if_finite``
skips a step whose clean gradient is non-finite and leaves every state untouched.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_common import METHODS, _rho, make_params, quadratic_loss

from sam_optax import registry

names = pytest.mark.parametrize("name", sorted(METHODS))
# Methods that never read the incoming gradient: both their gradients come from
# grad_fn (SAMPa: at x̃ and y; bSAM: at a posterior sample and at w + e).
IGNORES_INCOMING_GRADIENT = {n for n, m in registry.METHODS.items() if not m.uses_gradient}
BAD = pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


def _poison(tree, bad):
    """``tree`` with one entry of the kernel replaced by ``bad``."""
    tree = jax.tree.map(lambda x: x, tree)
    tree["dense"]["kernel"] = tree["dense"]["kernel"].at[1, 2].set(bad)
    return tree


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(IGNORES_INCOMING_GRADIENT)))
@BAD
def test_non_finite_gradient_propagates(name, bad):
    params = make_params()
    grad_fn = jax.grad(quadratic_loss)
    tx = METHODS[name](_rho(name), optax.sgd(0.1, momentum=0.9))
    updates, state = tx.update(
        _poison(grad_fn(params), bad), tx.init(params), params, grad_fn=grad_fn
    )
    assert not _all_finite(updates)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))


@names
@BAD
def test_non_finite_probe_gradient_propagates(name, bad):
    """The clean gradient is finite; the loss is not at the perturbed point."""
    params = make_params()
    grad_fn = jax.grad(quadratic_loss)
    tx = METHODS[name](_rho(name), optax.identity())
    updates, state = tx.update(
        grad_fn(params), tx.init(params), params, grad_fn=lambda p: _poison(grad_fn(p), bad)
    )
    probes = optax.tree.get(state, "probes")  # None: a method that probes on every step
    if probes is None or int(probes) == 1:
        assert not _all_finite(updates)
    else:  # a method that did not probe on this step gives the clean direction
        chex.assert_tree_all_finite(updates)


@names
def test_apply_if_finite_skips_the_step_and_keeps_the_state(name):
    tx = optax.apply_if_finite(
        METHODS[name](_rho(name), optax.sgd(0.05, momentum=0.9)), max_consecutive_errors=3
    )
    grad_fn = jax.grad(quadratic_loss)

    @jax.jit
    def step(params, state, poisoned):
        grads = grad_fn(params)
        grads = _poison(grads, jnp.where(poisoned, jnp.nan, grads["dense"]["kernel"][1, 2]))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    def train(schedule):
        params = make_params()
        state = tx.init(params)
        for poisoned in schedule:
            before = (params, state.inner_state)
            params, state = step(params, state, poisoned)
            if poisoned:
                chex.assert_trees_all_equal((params, state.inner_state), before)
                assert not bool(state.last_finite)
        return params, state

    clean, clean_state = train([False, False])
    skipped, skipped_state = train([False, True, False])
    chex.assert_trees_all_equal(clean, skipped)
    chex.assert_trees_all_equal(clean_state.inner_state, skipped_state.inner_state)
    assert int(skipped_state.total_notfinite) == 1
    assert int(clean_state.total_notfinite) == 0
