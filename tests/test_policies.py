"""Policies: a skipped step really skips the probe, decisions agree across devices."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from test_common import jit_probe_step

import sam_optax
from sam_optax import policies


def loss(p):
    return jnp.sum(jnp.cos(p["a"]) * p["a"] ** 2) + 0.5 * jnp.sum(p["b"] ** 4)


def params0():
    return {"a": jnp.array([0.3, -1.2, 2.0]), "b": jnp.array([[0.5, -0.7], [1.1, 0.2]])}


def test_skipped_step_does_not_run_grad_fn(calls):
    tx = sam_optax.sam(rho=0.05, policy=policies.every(3))
    step = jit_probe_step(tx, loss, calls.wrap(jax.grad(loss)))
    params, state = params0(), tx.init(params0())
    per_step, probes = [], []
    for _ in range(9):
        params, state, updates, g = step(params, state)
        per_step.append(calls.take())
        probes.append(int(state.probes))
        if per_step[-1] == 0:  # a skipped step returns g itself
            chex.assert_trees_all_equal(updates, g)
    assert per_step == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert probes == list(np.cumsum(per_step))
    assert int(state.count) == 9


@pytest.mark.parametrize(
    "policy", [policies.always, lambda: policies.every(1)], ids=["always", "every1"]
)
@pytest.mark.parametrize(
    "method",
    [
        sam_optax.sam,
        sam_optax.asam,
        sam_optax.fisher_sam,
        lambda **kw: sam_optax.esam(beta=0.6, gamma=1.0, **kw),
        sam_optax.gsam,
        sam_optax.wsam,
        sam_optax.vasso,
        sam_optax.friendly_sam,
        lambda rho, **kw: sam_optax.gam(rho_prime=rho, **kw),
        lambda **kw: sam_optax.gcsam(axes=lambda path, x: (0,) if x.ndim == 2 else None, **kw),
        lambda **kw: sam_optax.ssam(update_every=2, mode="dynamic", total_steps=10, **kw),
    ],
    ids=[
        "sam",
        "asam",
        "fisher_sam",
        "esam",
        "gsam",
        "wsam",
        "vasso",
        "friendly_sam",
        "gam",
        "gcsam",
        "ssam_d",
    ],
)
def test_full_policy_reproduces_full_method(method, policy):
    base = optax.sgd(0.05, momentum=0.9)
    full = optax.chain(method(rho=0.1), base)
    gated = optax.chain(method(rho=0.1, policy=policy()), base)

    def run(tx):
        params, state = params0(), tx.init(params0())
        for _ in range(4):
            g = jax.grad(loss)(params)
            updates, state = tx.update(g, state, params, grad_fn=jax.grad(loss))
            params = optax.apply_updates(params, updates)
        return params, state[0].probes

    p_full, n_full = jax.jit(lambda: run(full))()
    p_gated, n_gated = jax.jit(lambda: run(gated))()
    chex.assert_trees_all_equal(p_full, p_gated)
    assert int(n_full) == int(n_gated) == 4


def test_bernoulli_fraction_seed_and_schedule():
    def probes(policy, steps):
        tx = sam_optax.sam(rho=0.05, policy=policy)
        params = params0()
        state = tx.init(params)
        decide = jax.jit(
            lambda s: tx.update(jax.grad(loss)(params), s, params, grad_fn=jax.grad(loss))[1]
        )
        out = []
        for _ in range(steps):
            before = int(state.probes)
            state = decide(state)
            out.append(int(state.probes) - before)
        return np.array(out)

    draws = probes(policies.bernoulli(0.3, seed=1), 300)
    assert 0.22 < draws.mean() < 0.38
    np.testing.assert_array_equal(draws[:40], probes(policies.bernoulli(0.3, seed=1), 40))
    assert not np.array_equal(draws[:40], probes(policies.bernoulli(0.3, seed=2), 40))
    late = probes(policies.bernoulli(lambda t: jnp.where(t < 10, 0.0, 1.0)), 20)
    np.testing.assert_array_equal(late, [0] * 10 + [1] * 10)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: policies.every(0), "`k`"),
        (lambda: policies.every(2.0), "`k`"),
        (lambda: policies.bernoulli(1.5), "`p`"),
        (lambda: policies.bernoulli(0.5, seed=0.5), "`seed`"),
        (lambda: policies.adaptive(0), "`total_steps`"),
        (lambda: policies.adaptive(10, delta=1.0), "`delta`"),
        (lambda: policies.adaptive(10, lambda1="x"), "`lambda1`"),
        (lambda: sam_optax.sam(policy="every"), "`policy`"),
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_nan_in_skipped_probe_never_reaches_output():
    nan_grad = lambda p: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)  # noqa: E731
    tx = sam_optax.sam(rho=0.05, policy=policies.every(2))
    step = jit_probe_step(tx, loss, nan_grad)
    params, state = params0(), tx.init(params0())
    _, state, updates, _ = step(params, state)  # probes: NaN, as it should
    assert np.isnan(np.asarray(updates["a"])).all()
    _, state, updates, g = step(params, state)  # skipped: the NaN branch is not taken
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal(updates, g)


def _device_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 3)).astype(np.float32)
    curv = np.linspace(0.2, 3.0, 8, dtype=np.float32)
    return centres, curv


def _local_grad(w, centre, curv):
    return curv * (w - centre)


def _shard_run(policy, steps, rho=0.3, lr=0.2):
    """SAM under shard_map on 8 devices with different data; per-device probe counts."""
    centres, curv = _device_data()
    mesh = jax.make_mesh((8,), ("d",))
    tx = sam_optax.sam(rho=rho, policy=policy, axis_name="d")

    def local(w, state, centre, c):
        grad_fn = lambda p: _local_grad(p, centre[0], c[0])  # noqa: E731
        updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
        return w - lr * updates, state, state.probes[None]

    step = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(), P("d"), P("d")),
            out_specs=(P(), P(), P("d")),
            check_vma=False,
        )
    )
    sharded = jax.sharding.NamedSharding(mesh, P("d"))
    centres, curv = jax.device_put(centres, sharded), jax.device_put(curv, sharded)
    w = jnp.zeros(3)
    state = tx.init(w)
    history = []
    for _ in range(steps):
        w, state, per_device = step(w, state, centres, curv)
        history.append(np.asarray(per_device))
    return np.stack(history)


@pytest.mark.parametrize(
    "policy",
    [lambda: policies.every(3), lambda: policies.bernoulli(0.5), lambda: policies.adaptive(12)],
    ids=["every", "bernoulli", "adaptive"],
)
def test_same_decision_on_every_device(policy):
    history = _shard_run(policy(), 12)
    assert (history == history[:, :1]).all(), history
    taken = np.diff(np.concatenate([[0], history[:, 0]]))
    assert 0 < taken.sum() < 12  # the decisions vary over time


def test_adaptive_decisions_follow_averaged_statistic():
    """Local ``‖g‖²`` would disagree across devices; the pmean'd one decides for all."""
    steps, rho, lr, delta = 12, 0.3, 0.2, 0.9
    history = _shard_run(policies.adaptive(steps, delta=delta), steps, rho=rho, lr=lr)
    centres, curv = (x.astype(np.float64) for x in _device_data())
    w, mu, var = np.zeros(3), 0.0, 0.0
    local_mu, local_var = np.zeros(8), np.zeros(8)
    decisions, disagreements = [], 0
    for t in range(steps):
        g = curv[:, None] * (w - centres)
        s_local = np.sum(g**2, axis=1)
        s = s_local.mean()
        c = (t / steps) * -1.0 + (1 - t / steps) * 1.0
        if t == 0:
            mu, var, local_mu, local_var = s, 0.0, s_local.copy(), np.zeros(8)
        else:
            mu = delta * mu + (1 - delta) * s
            var = delta * var + (1 - delta) * (s - mu) ** 2
            local_mu = delta * local_mu + (1 - delta) * s_local
            local_var = delta * local_var + (1 - delta) * (s_local - local_mu) ** 2
        probe = s >= mu + c * np.sqrt(var)
        local = s_local >= local_mu + c * np.sqrt(local_var)
        disagreements += int(local.any() and not local.all())
        if probe:
            e = rho * g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-12)
            out = curv[:, None] * (w + e - centres)
        else:
            out = g
        w = w - lr * out.mean(axis=0)
        decisions.append(int(probe))
    np.testing.assert_array_equal(history[:, 0], np.cumsum(decisions))
    assert disagreements > 0
