"""The pair oracle and the two-group recipe of docs/methods/parallel.md.

SAMPa's and RWP's two gradients do not depend on each other (checked on the jaxpr),
and the pair evaluated on two device groups of a ('pair', 'data') mesh (8 fake CPU
devices, tests/conftest.py) gives the single-device step.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.core import Literal
from jax.sharding import AxisType

import sam_optax

RNG = np.random.default_rng(0)
BATCHES = [
    (
        jnp.asarray(RNG.normal(size=(8, 3)), jnp.float32),
        jnp.asarray(RNG.normal(size=8), jnp.float32),
    )
    for _ in range(4)
]


def ls_loss(x, batch):
    a, b = batch
    return 0.5 * jnp.mean((a @ x - b) ** 2)


def test_pair_grad_fn_is_two_gradients():
    pair = sam_optax.pair_grad_fn(ls_loss, BATCHES[0], BATCHES[1])
    xa, xb = jnp.array([1.0, 2.0, 3.0]), jnp.array([-1.0, 0.5, 0.0])
    ga, gb = jax.jit(pair)(xa, xb)
    chex.assert_trees_all_close(ga, jax.grad(ls_loss)(xa, BATCHES[0]), rtol=1e-6)
    chex.assert_trees_all_close(gb, jax.grad(ls_loss)(xb, BATCHES[1]), rtol=1e-6)


# ----- Independence: neither gradient's input depends on the other gradient. -----


def host_grad(batch):
    """A gradient as one opaque host callback: one `pure_callback` equation per evaluation."""

    def grad_fn(x):
        return jax.pure_callback(
            lambda v: np.asarray(jax.grad(ls_loss)(v, batch)),
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            x,
        )

    return grad_fn


def callback_ancestors(jaxpr):
    """For each pure_callback equation, the earlier callbacks that its inputs depend on.

    Any other equation (nested jaxprs included) is a black box whose outputs depend on
    all its inputs: a conservative analysis, so "no ancestor" is a proof of independence.
    """
    deps: dict = {}
    found = []
    for eqn in jaxpr.eqns:
        variables = [v for v in eqn.invars if not isinstance(v, Literal)]
        seen = set().union(*(deps.get(v, set()) for v in variables))
        if eqn.primitive.name == "pure_callback":
            found.append(seen)
            seen = seen | {len(found) - 1}
        for v in eqn.outvars:
            deps[v] = seen
    return found


def test_sampa_gradients_are_independent_in_the_program():
    tx = sam_optax.sampa(optax.sgd(0.1, momentum=0.9), same_batch=True)
    x = jnp.ones(3)
    state = tx.init(x)
    _, state = tx.update(None, state, x, grad_fn=host_grad(BATCHES[0]))  # G != 0 now
    jaxpr = jax.make_jaxpr(lambda x, s: tx.update(None, s, x, grad_fn=host_grad(BATCHES[1])))(
        x, state
    ).jaxpr
    ancestors = callback_ancestors(jaxpr)
    assert ancestors == [set(), set()]


def test_rwp_gradients_are_independent_in_the_program():
    """The noise does not read g: the clean and the noisy gradient can run at once."""
    tx = sam_optax.rwp(rho=0.01)
    x = jnp.ones(3)
    clean, noisy = host_grad(BATCHES[0]), host_grad(BATCHES[1])  # the official data split
    jaxpr = jax.make_jaxpr(lambda x, s: tx.update(clean(x), s, x, grad_fn=noisy))(
        x, tx.init(x)
    ).jaxpr
    assert callback_ancestors(jaxpr) == [set(), set()]


def test_sam_gradients_are_not_independent():
    """The check can fail: SAM's probe point is built from the clean gradient."""
    tx = sam_optax.sam(rho=0.05)
    x = jnp.ones(3)
    g = host_grad(BATCHES[0])
    jaxpr = jax.make_jaxpr(lambda x, s: tx.update(g(x), s, x, grad_fn=g))(x, tx.init(x)).jaxpr
    assert callback_ancestors(jaxpr) == [set(), {0}]


# ----- The two-group recipe: a ('pair', 'data') mesh on 8 devices. -----


def sampa_steps(**oracle):
    tx = sam_optax.sampa(optax.sgd(0.05, momentum=0.9), rho=0.1, lam=0.2)

    @jax.jit
    def step(x, state, prev, batch):
        pair = sam_optax.pair_grad_fn(ls_loss, prev, batch, **oracle)
        updates, state = tx.update(None, state, x, pair_grad_fn=pair)
        return optax.apply_updates(x, updates), state

    x = jnp.array([0.5, -1.0, 2.0])
    state = tx.init(x)
    for t in range(len(BATCHES)):
        x, state = step(x, state, BATCHES[max(t - 1, 0)], BATCHES[t])
    return x, state, step


@pytest.mark.parametrize("shard_map", [True, False], ids=["shard_map", "gspmd"])
def test_two_device_groups_give_the_single_device_step(shard_map):
    mesh = jax.make_mesh((2, 4), ("pair", "data"), axis_types=(AxisType.Auto, AxisType.Auto))
    want, want_state, _ = sampa_steps()
    got, got_state, step = sampa_steps(
        mesh=mesh, axis="pair", data_axis="data", shard_map=shard_map
    )
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got_state.g, want_state.g, rtol=1e-5, atol=1e-6)
    if shard_map:
        # Each group averages its gradient over its own 4 devices; the only exchange
        # between the groups is the pair of gradients (devices i and i + 4).
        text = step.lower(got, got_state, *BATCHES[:2]).compile().as_text()
        groups = re.findall(r" all-reduce\(.*?replica_groups=(\{\{[\d,{}]*\}\})", text)
        assert "{{0,1,2,3},{4,5,6,7}}" in groups, groups
        assert set(groups) <= {"{{0,1,2,3},{4,5,6,7}}", "{{0,4},{1,5},{2,6},{3,7}}"}, groups


@pytest.mark.parametrize(
    ("kwargs", "arg", "fragment"),
    [
        ({"loss_fn": "f"}, "loss_fn", "'f'"),
        ({"batch_b": jnp.ones(3)}, "batch_b", "structure"),
        ({"batch_b": (jnp.ones((4, 3)), jnp.ones(8))}, "batch_b", "(4, 3)"),
        ({"mesh": "m"}, "mesh", "'m'"),
        ({"shard_map": True}, "shard_map", "mesh"),
        ({"mesh": "pair4", "axis": "pair"}, "axis", "size 4"),
        ({"mesh": "pair2", "axis": "nope"}, "axis", "'nope'"),
        ({"mesh": "pair2", "data_axis": "x"}, "data_axis", "'x'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg, fragment):
    meshes = {
        "pair4": jax.make_mesh((4, 2), ("pair", "data"), axis_types=(AxisType.Auto,) * 2),
        "pair2": jax.make_mesh((2, 4), ("pair", "data"), axis_types=(AxisType.Auto,) * 2),
    }
    kwargs = {"loss_fn": ls_loss, "batch_a": BATCHES[0], "batch_b": BATCHES[1], **kwargs}
    if isinstance(kwargs.get("mesh"), str) and kwargs["mesh"] in meshes:
        kwargs["mesh"] = meshes[kwargs["mesh"]]
    with pytest.raises(ValueError, match=f"(?s)`{arg}`.*{re.escape(fragment)}"):
        sam_optax.pair_grad_fn(**kwargs)
