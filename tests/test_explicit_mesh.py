"""Every registered method, and every state-carrying piece, on 8 devices with FSDP params.

Two meshes: the Explicit one that ``jax.make_mesh`` builds, used inside
``jax.set_mesh`` (the sharding is part of every array's type; the loss gathers the
params with ``reshard``), and the plain ``jax.sharding.Mesh`` of
``docs/multi_device.md`` section 1. Each case trains the toy regression of
``dp_toy`` for 3 steps with the kernel sharded ``P(None, "data")``, the bias
``P("data")`` and the batch ``P("data")``, and must give the params and the state of
the same steps on one device, with every state leaf sharded like the param of its
shape (the state initialised from the params keeps their sharding).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_toy import LR, base, loss_fn, make_batch, make_params
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import registry

STEPS, BATCH = 3, 32
TOTAL_STEPS = 2  # SWA/WASAM then average from step 1 on; AE-SAM's schedule ends inside the run
SPECS = {"kernel": P(None, "data"), "bias": P("data")}

# Pieces with state that no registry default reaches: (registry name, overrides).
EXTRA = {"looksam_layerwise": ("looksam", {"layerwise": True})}
CASES = {**{name: (name, {}) for name in registry.METHODS}, **EXTRA}


def per_example_loss(params, batch):
    x, y = batch
    return jnp.mean(jnp.square(x @ params["kernel"] + params["bias"] - y), axis=-1)


def gathered(fn):
    """``fn`` with its params gathered first, as an FSDP model does under Explicit axes."""

    def run(params, batch):
        return fn(jax.tree.map(lambda w: jax.sharding.reshard(w, P()), params), batch)

    return run


def make_tx(case):
    name, overrides = CASES[case]
    return registry.make_optimizer(
        name, base(), learning_rate=LR, total_steps=TOTAL_STEPS, num_data=1000, **overrides
    )


def make_step(tx, loss, per_example):
    """ESAM's data selection needs the per-example losses and the batch; others ignore them."""

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        grad_fn = lambda p: jax.grad(loss)(p, batch)  # noqa: E731
        updates, state = tx.update(
            grads, state, params, grad_fn=grad_fn, per_example_loss_fn=per_example, batch=batch
        )
        return optax.apply_updates(params, updates), state

    return step


def batches():
    return [make_batch(BATCH, seed=s) for s in range(STEPS)]


def train(step, params, state, data):
    for batch in data:
        params, state = step(params, state, batch)
    return params, state


@functools.cache
def one_device(case):
    tx = make_tx(case)
    params = make_params()
    return train(make_step(tx, loss_fn, per_example_loss), params, tx.init(params), batches())


def explicit_run(case, mesh):
    tx = make_tx(case)
    step = make_step(tx, gathered(loss_fn), gathered(per_example_loss))
    with jax.set_mesh(mesh):
        params = {k: jax.device_put(v, SPECS[k]) for k, v in make_params().items()}
        state = tx.init(params)
        data = [jax.device_put(b, P("data")) for b in batches()]
        return (params, state), train(step, params, state, data)


def plain_run(case, mesh):
    tx = make_tx(case)
    step = make_step(tx, loss_fn, per_example_loss)
    params = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in make_params().items()}
    state = tx.init(params)
    data = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches()]
    return (params, state), train(step, params, state, data)


@pytest.fixture(scope="module")
def meshes():
    return {
        "explicit": (
            explicit_run,
            jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,)),
        ),
        "plain": (plain_run, jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))),
    }


def state_types(tree):
    """The NamedTuple classes anywhere in an optimizer state."""
    found = set()

    def visit(node):
        if isinstance(node, tuple):
            if hasattr(node, "_fields"):
                found.add(type(node))
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(tree)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["explicit", "plain"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp_matches_one_device_and_state_keeps_sharding(meshes, kind, case):
    run, mesh = meshes[kind]
    (params, state), (new_params, new_state) = run(case, mesh)
    expected_params, expected_state = one_device(case)
    chex.assert_trees_all_close(new_params, expected_params, rtol=2e-5, atol=2e-6)
    # The state holds gradient-sized leaves (the momentum), LookSAM's g_v is a difference
    # of nearly equal gradients: its float32 rounding follows the reduction order, and
    # on the params both results are within 3e-6 of a float64 run.
    chex.assert_trees_all_close(new_state, expected_state, rtol=2e-5, atol=1e-5)
    assert not params["kernel"].sharding.is_fully_replicated
    by_shape = {np.shape(w): w.sharding for w in jax.tree.leaves(params)}
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
        want = by_shape.get(np.shape(before))
        if want is None:  # a small leaf (a count, a key, a norm): replicated
            assert after.sharding.is_fully_replicated, (case, after.sharding)
            continue
        for leaf in (before, after):  # a params-shaped leaf: sharded like that param
            assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (case, leaf.sharding)


def test_the_cases_reach_every_state_carrying_piece():
    """A new piece with a state of its own must join ``CASES`` (``EXTRA`` if need be)."""
    params = make_params()
    reached = set().union(*(state_types(make_tx(case).init(params)) for case in CASES))
    public = {
        getattr(module, name)
        for module in (sam_optax, sam_optax.policies)
        for name in dir(module)
        if name.endswith("State") and isinstance(getattr(module, name), type)
    }
    # m_sharpness wraps a method in its own update(state, params, batch) API, tested
    # against one device in tests/test_m_sharpness.py.
    assert public - reached == {sam_optax.MSharpnessState}
