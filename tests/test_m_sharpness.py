"""m-sharpness: across devices with the local gradient, and on one device with explicit m.

(a) 8 devices x m examples, each passing its local gradient to a method built with
``axis_name``, and (b) ``sam_optax.m_sharpness`` with 8 groups of m on one device give
the same update, and both equal the NumPy float64 m-sharpness of docs/multi_device.md.
"""

from __future__ import annotations

import functools

import chex
import jax
import numpy as np
import optax
import pytest
from dp_toy import (
    LR,
    loss_fn,
    make_batch,
    make_params,
    np_m_sharpness_out,
    np_sam_out,
    np_train,
    run,
)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

DEVICES, M, STEPS, RHO = 8, 4, 2, 0.05
METHODS = {
    "sam": functools.partial(sam_optax.sam, rho=RHO),
    "asam": functools.partial(sam_optax.asam, rho=0.5),
}


def batches(n=DEVICES * M):
    return [make_batch(n, seed=s) for s in range(STEPS)]


def assert_close(actual, expected):
    chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-6)


def explicit_m(method, m=M, sequential=False):
    """(b): one device, ``m_sharpness`` with explicit m, then plain SGD."""
    msam = sam_optax.m_sharpness(
        method(), loss_fn, m=m, batch_size=DEVICES * M, sequential=sequential
    )
    sgd = optax.sgd(LR)

    @jax.jit
    def step(params, states, batch):
        out, state, _ = msam.update(states[0], params, batch)
        updates, sgd_state = sgd.update(out, states[1], params)
        return optax.apply_updates(params, updates), (state, sgd_state)

    params = make_params()
    return run(step, params, (msam.init(params), sgd.init(params)), batches())


def across_pmap(method):
    """(a): 8 devices, each perturbs with its local gradient; the method averages."""
    tx = optax.chain(method(axis_name="data"), optax.sgd(LR))

    @functools.partial(jax.pmap, axis_name="data")
    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)  # local: m-sharpness with m = M
        grad_fn = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    params = make_params()
    rep = lambda t: jax.tree.map(lambda x: np.stack([x] * DEVICES), t)  # noqa: E731
    shard = lambda t: jax.tree.map(lambda x: x.reshape(DEVICES, M, *x.shape[1:]), t)  # noqa: E731
    p, state = run(step, rep(params), rep(tx.init(params)), map(shard, batches()))
    return jax.tree.map(lambda x: x[0], p), state


def across_shard_map(method):
    """(a) with shard_map: the gradient is taken w.r.t. device-varying params."""
    tx = optax.chain(method(axis_name="data"), optax.sgd(LR))
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("data",))

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P())
    )
    def step(params, state, batch):
        local = jax.lax.pcast(params, "data", to="varying")  # else grad is all-reduced
        grads = jax.grad(loss_fn)(local, batch)
        grad_fn = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    params = make_params()
    params, state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
    data = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batches()]
    return run(step, params, state, data)


def numpy_reference():
    out_fn = functools.partial(np_m_sharpness_out, rho=RHO, m=M)
    return np_train(make_params(), batches(), out_fn)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_devices_with_local_gradient_equal_explicit_m(name):
    on_devices, state = across_pmap(METHODS[name])
    on_one, (m_state, _) = explicit_m(METHODS[name])
    assert_close(on_devices, on_one)
    assert m_state.groups.count.shape == (DEVICES,)
    np.testing.assert_array_equal(m_state.groups.probes, STEPS)
    np.testing.assert_array_equal(state[0].probes, STEPS)


def test_explicit_m_equals_numpy_float64():
    expected = numpy_reference()
    assert_close(explicit_m(METHODS["sam"])[0], expected)
    assert_close(explicit_m(METHODS["sam"], sequential=True)[0], expected)


def test_shard_map_with_local_gradient_equals_numpy_float64():
    assert_close(across_shard_map(METHODS["sam"])[0], numpy_reference())


def test_m_equal_to_batch_is_sam_on_the_whole_batch():
    params, _ = explicit_m(METHODS["sam"], m=DEVICES * M)
    expected = np_train(make_params(), batches(), functools.partial(np_sam_out, rho=RHO))
    assert_close(params, expected)
    with pytest.raises(AssertionError):
        assert_close(params, numpy_reference())  # the grouping matters


def test_groups_within_devices():
    """2 devices x 4 groups of m each, equal to 8 groups of m on one device."""
    devices = 2
    msam = sam_optax.m_sharpness(
        sam_optax.sam(RHO, axis_name="data"), loss_fn, m=M, batch_size=DEVICES * M // devices
    )

    @functools.partial(jax.pmap, axis_name="data")
    def step(params, state, batch):
        out, state, loss = msam.update(state, params, batch)
        return optax.apply_updates(params, jax.tree.map(lambda u: -LR * u, out)), state, loss

    params = make_params()
    rep = lambda t: jax.tree.map(lambda x: np.stack([x] * devices), t)  # noqa: E731
    p, s = rep(params), rep(msam.init(params))
    for batch in batches():
        p, s, loss = step(p, s, jax.tree.map(lambda x: x.reshape(devices, -1, *x.shape[1:]), batch))
        jax.block_until_ready(p)
    assert_close(jax.tree.map(lambda x: x[0], p), numpy_reference())
    assert loss.shape == (devices,)


def test_sequential_groups_within_shard_map():
    """As above with shard_map and lax.scan: the carries vary over devices as needed."""
    devices = 2
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    tx = sam_optax.sam(RHO, axis_name="data")
    msam = sam_optax.m_sharpness(
        tx, loss_fn, m=M, batch_size=DEVICES * M // devices, sequential=True
    )

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P(), P())
    )
    def step(params, state, batch):
        local = jax.lax.pcast(params, "data", to="varying")
        out, state, loss = msam.update(state, local, batch)
        new = jax.tree.map(lambda w, u: w - LR * u, params, out)
        return new, state, jax.lax.pmean(loss, "data")

    params = make_params()
    state = msam.init(params)
    for batch in batches():
        params, state, _ = step(
            params, state, jax.device_put(batch, NamedSharding(mesh, P("data")))
        )
        jax.block_until_ready(params)
    assert_close(params, numpy_reference())


def test_aux_is_stacked_over_groups():
    def loss_with_aux(params, batch):
        loss = loss_fn(params, batch)
        return loss, {"loss": loss}

    msam = sam_optax.m_sharpness(
        sam_optax.sam(RHO), loss_with_aux, m=M, batch_size=16, has_aux=True
    )
    params, batch = make_params(), make_batch(16)
    _, _, (loss, aux) = jax.jit(msam.update)(msam.init(params), params, batch)
    assert aux["loss"].shape == (4,)
    np.testing.assert_allclose(loss, np.mean(aux["loss"]), rtol=1e-6)
    np.testing.assert_allclose(loss, loss_fn(params, batch), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"m": 0, "batch_size": 8}, "`m` must be a positive integer, got 0"),
        ({"m": 2.0, "batch_size": 8}, "`m` must be a positive integer, got 2.0"),
        ({"m": 3, "batch_size": 8}, "`m`=3 must divide `batch_size`=8"),
        ({"m": 2, "batch_size": -8}, "`batch_size` must be a positive integer, got -8"),
    ],
)
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.m_sharpness(sam_optax.sam(), loss_fn, **kwargs)


def test_batch_that_does_not_match_raises():
    msam = sam_optax.m_sharpness(sam_optax.sam(), loss_fn, m=4, batch_size=16)
    params = make_params()
    state = jax.eval_shape(msam.init, params)
    with pytest.raises(ValueError, match="`batch_size`=16 does not match the batch"):
        jax.eval_shape(msam.update, state, params, make_batch(8))
    with pytest.raises(ValueError, match="`m`=4 must divide the batch size 10"):
        jax.eval_shape(msam.update, state, params, make_batch(10))
