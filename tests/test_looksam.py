"""LookSAM against an independent NumPy float64 implementation of docs/methods/efficient.md."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_common import jit_probe_step

import sam_optax

C1 = np.array([1.0, 2.0, 0.5])
C2 = np.array([[3.0, 1.0], [0.5, 2.0]])
EPS = 1e-12


def loss(p):
    a, b = p["a"], p["b"]
    return jnp.sum(C1 * a**4) / 4 + 0.5 * jnp.sum(C2 * (b - 1.0) ** 2) + jnp.sum(a) * jnp.sum(b)


def np_grad(w):
    a, b = w
    return [C1 * a**3 + b.sum(), C2 * (b - 1.0) + a.sum()]


def params0():
    return {"a": jnp.array([0.8, -1.1, 1.5]), "b": jnp.array([[0.2, -0.4], [1.3, 0.6]])}


def as_np(p):
    return [np.asarray(p["a"], np.float64), np.asarray(p["b"], np.float64)]


def groups(x, layerwise):
    """Leaves as flat float64 vectors: one group per leaf, or one concatenated group."""
    flat = [np.ravel(v) for v in x]
    return flat if layerwise else [np.concatenate(flat)]


def ungroup(parts, like):
    flat = np.concatenate(parts)
    out, i = [], 0
    for v in like:
        out.append(flat[i : i + v.size].reshape(v.shape))
        i += v.size
    return out


def reference(w, steps, rho, k, alpha, lr, layerwise):
    """LookSAM + SGD in float64, per docs/methods/efficient.md; returns params and g_v per step."""
    g_v = [np.zeros_like(v) for v in w]
    params, stored = [], []
    for t in range(steps):
        g = np_grad(w)
        if t % k == 0:
            norm = np.sqrt(sum(np.sum(x**2) for x in g))
            g_s = np_grad([v + rho * x / (norm + EPS) for v, x in zip(w, g, strict=True)])
            parts = [
                s - (gi @ s) / (gi @ gi + EPS) * gi
                for gi, s in zip(groups(g, layerwise), groups(g_s, layerwise), strict=True)
            ]
            g_v = ungroup(parts, w)
            out = g_s
        else:
            parts = [
                gi + alpha * np.linalg.norm(gi) / (np.linalg.norm(vi) + EPS) * vi
                for gi, vi in zip(groups(g, layerwise), groups(g_v, layerwise), strict=True)
            ]
            out = ungroup(parts, w)
        w = [v - lr * o for v, o in zip(w, out, strict=True)]
        params.append(w)
        stored.append(g_v)
    return params, stored


@pytest.mark.parametrize("layerwise", [False, True], ids=["global", "layerwise"])
def test_twelve_steps_match_numpy(layerwise, calls):
    # float32 against float64: a small leaf-wise g_v (about 0.006 here) amplifies
    # rounding through ‖g‖/‖g_v‖, hence the 1e-4 relative tolerance.
    rho, k, alpha, lr = 0.1, 5, 0.7, 0.05
    tx = optax.chain(sam_optax.looksam(rho, k, alpha, layerwise=layerwise), optax.sgd(lr))
    step = jit_probe_step(tx, loss, calls.wrap(jax.grad(loss)))
    want_params, want_gv = reference(as_np(params0()), 12, rho, k, alpha, lr, layerwise)
    params, state = params0(), tx.init(params0())
    for t in range(12):
        params, state, _, _ = step(params, state)
        assert calls.take() == (1 if t % k == 0 else 0), t
        np.testing.assert_allclose(as_np(params)[0], want_params[t][0], rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(as_np(params)[1], want_params[t][1], rtol=1e-4, atol=2e-5)
        got_gv = as_np(state[0].combine.g_v)
        np.testing.assert_allclose(got_gv[0], want_gv[t][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_gv[1], want_gv[t][1], rtol=1e-4, atol=1e-5)
        # The stored norm (reused by skipped steps) is the norm of the stored g_v.
        v = want_gv[t]
        want_norm = (
            [np.linalg.norm(x) for x in v]
            if layerwise
            else [np.linalg.norm(np.concatenate([x.ravel() for x in v]))]
        )
        np.testing.assert_allclose(state[0].combine.g_v_norm, want_norm, rtol=1e-4, atol=1e-6)
    assert int(state[0].probes) == 3 and int(state[0].count) == 12


def test_published_defects_cannot_happen(calls):
    """Stale weights, a g_v never built, two passes on every step: none of them here."""
    rho, alpha = 0.1, 0.7
    tx = sam_optax.looksam(rho, k=4, alpha=alpha)
    step = jit_probe_step(tx, loss, calls.wrap(jax.grad(loss)))
    _, state, _, _ = step(params0(), tx.init(params0()))
    assert calls.take() == 1
    # g_v is built on the probing step, as the reference builds it.
    _, (want_gv,) = reference(as_np(params0()), 1, rho, 4, alpha, 0.0, False)
    got_gv = as_np(state.combine.g_v)
    assert np.linalg.norm(want_gv[0]) > 0.1
    np.testing.assert_allclose(got_gv[0], want_gv[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_gv[1], want_gv[1], rtol=1e-4, atol=1e-5)
    # A later step at unrelated weights: its direction is built from the gradient at
    # those current weights (nothing is restored) plus the stored g_v, with one gradient.
    elsewhere = jax.tree.map(lambda x: x + 0.37, params0())
    for _ in range(3):
        _, state, updates, grads = step(elsewhere, state)
        assert calls.take() == 0
        g = np.concatenate([np.ravel(x) for x in np_grad(as_np(elsewhere))])
        v = np.concatenate([np.ravel(x) for x in want_gv])
        want = g + alpha * np.linalg.norm(g) / np.linalg.norm(v) * v
        got = np.concatenate([np.ravel(x) for x in as_np(updates)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.linalg.norm(got - np.concatenate([np.ravel(x) for x in as_np(grads)])) > 0.1
    assert int(state.probes) == 1 and int(state.count) == 4
    _, state, _, _ = step(elsewhere, state)
    assert calls.take() == 1


def test_k_one_is_sam():
    def run(tx):
        params, state = params0(), tx.init(params0())
        for _ in range(4):
            updates, state = tx.update(
                jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss)
            )
            params = optax.apply_updates(params, updates)
        return params

    base = optax.sgd(0.05)
    ours = jax.jit(lambda: run(optax.chain(sam_optax.looksam(0.1, k=1), base)))()
    theirs = jax.jit(lambda: run(optax.chain(sam_optax.sam(0.1), base)))()
    chex.assert_trees_all_equal(ours, theirs)


def test_nan_in_the_branch_not_taken():
    tx = sam_optax.looksam(0.1, k=2)
    params = params0()
    # A probing step with a poisoned g_v: the fallback is not taken, its NaN stays out.
    state = tx.init(params)
    poisoned = state._replace(combine=jax.tree.map(lambda x: x * np.nan, state.combine))
    step = jit_probe_step(tx, loss, jax.grad(loss))
    _, state, updates, _ = step(params, poisoned)
    chex.assert_tree_all_finite((updates, state.combine.g_v))
    # A skipped step whose probe would be NaN: the probe is not taken.
    nan_fn = lambda p: jax.tree.map(lambda x: x * np.nan, p)  # noqa: E731
    _, _, updates, _ = jit_probe_step(tx, loss, nan_fn)(params, state)
    chex.assert_tree_all_finite(updates)


def test_unperturbed_leaves_get_plain_gradient_on_skipped_steps():
    tx = sam_optax.looksam(0.1, k=2, mask={"a": True, "b": False})
    step = jit_probe_step(tx, loss, jax.grad(loss))
    params = params0()
    _, state, _, _ = step(params, tx.init(params))
    assert float(jnp.abs(state.combine.g_v["b"]).max()) == 0.0
    _, _, updates, grads = step(params, state)
    chex.assert_trees_all_equal(updates["b"], grads["b"])
    assert float(jnp.abs(updates["a"] - grads["a"]).max()) > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [({"k": 0}, "`k`"), ({"alpha": -1.0}, "`alpha`"), ({"rho": -0.1}, "`rho`")],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.looksam(**kwargs)
