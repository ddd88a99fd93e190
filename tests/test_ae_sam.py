"""AE-SAM and AE-LookSAM against an independent NumPy float64 implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import registry

STEPS, RHO, ALPHA, DELTA, EPS = 30, 0.05, 0.7, 0.9, 1e-12
W = np.array([0.5, -1.0, 2.0, 0.25])


def grad_fn(p):
    """The probe's gradient: an affine map, easy to evaluate in NumPy."""
    return 3.0 * p + jnp.array([1.0, 0.0, -1.0, 0.5])


def np_grad_fn(p):
    return 3.0 * p + np.array([1.0, 0.0, -1.0, 0.5])


def gradient_stream():
    rng = np.random.default_rng(3)
    scales = np.exp(rng.normal(0.0, 0.6, STEPS))
    return (rng.normal(size=(STEPS, W.size)) * scales[:, None]).astype(np.float32)


def reference_decisions(gs):
    """The AE-SAM rule of docs/methods/efficient.md in float64: (probe, mu, var) per step."""
    out, mu, var = [], 0.0, 0.0
    for t, g in enumerate(gs.astype(np.float64)):
        s = np.sum(g**2)
        if t == 0:
            mu, var = s, 0.0
        else:
            mu = DELTA * mu + (1 - DELTA) * s
            var = DELTA * var + (1 - DELTA) * (s - mu) ** 2
        c = (t / STEPS) * -1.0 + (1 - t / STEPS) * 1.0
        threshold = mu + c * np.sqrt(var)
        if t > 0:  # the rule is not decided by float32 rounding
            assert abs(s - threshold) > 1e-4 * threshold
        out.append((s >= threshold, mu, var))
    return out


def run(tx, gs, calls):
    """Yields (output, state, grad_fn executions) for each gradient of the stream."""
    step = jax.jit(
        lambda g, s: tx.update(g, s, jnp.asarray(W, jnp.float32), grad_fn=calls.wrap(grad_fn))
    )
    state = tx.init(jnp.asarray(W, jnp.float32))
    for g in gs:
        out, state = step(jnp.asarray(g), state)
        yield out, state, calls.take()


def sam_out(g):
    g = g.astype(np.float64)
    return np_grad_fn(W + RHO * g / (np.linalg.norm(g) + EPS)), g


def test_ae_sam_statistics_and_decisions_over_30_steps(calls):
    gs = gradient_stream()
    want = reference_decisions(gs)
    decisions = [bool(p) for p, _, _ in want]
    assert 5 < sum(decisions) < STEPS - 5  # both branches are exercised
    tx = sam_optax.ae_sam(RHO, total_steps=STEPS, delta=DELTA)
    for t, (out, state, executed) in enumerate(run(tx, gs, calls)):
        probe, mu, var = want[t]
        assert executed == int(probe), t
        scale = float(state.policy.scale)  # the statistics are stored in units of scale
        np.testing.assert_allclose(float(state.policy.mu) * scale**2, mu, rtol=1e-5)
        np.testing.assert_allclose(float(state.policy.var) * scale**4, var, rtol=1e-4, atol=1e-6)
        g_s, g = sam_out(gs[t])
        np.testing.assert_allclose(np.asarray(out), g_s if probe else g, rtol=1e-5, atol=1e-6)
    assert int(state.probes) == sum(decisions) and int(state.count) == STEPS


def test_ae_looksam_reuses_g_v_between_adaptive_probes(calls):
    gs = gradient_stream()
    want = reference_decisions(gs)
    tx = sam_optax.ae_looksam(RHO, total_steps=STEPS, alpha=ALPHA, delta=DELTA)
    g_v = np.zeros(W.size)
    for t, (out, state, executed) in enumerate(run(tx, gs, calls)):
        probe = want[t][0]
        g_s, g = sam_out(gs[t])
        if probe:
            g_v = g_s - (g @ g_s) / (g @ g + EPS) * g
            expected = g_s
        else:
            expected = g + ALPHA * np.linalg.norm(g) / (np.linalg.norm(g_v) + EPS) * g_v
        assert executed == int(probe), t
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.combine.g_v), g_v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", [sam_optax.ae_sam, sam_optax.ae_looksam])
def test_decisions_do_not_change_when_gradients_are_scaled_by_1e10(method, calls):
    """‖g‖⁴ overflows float32 near ‖g‖ = 1e10; the scaled statistics do not."""
    gs = gradient_stream()
    want = [bool(p) for p, _, _ in reference_decisions(gs)]
    for factor in (1.0, 1e10):
        tx = method(RHO, total_steps=STEPS, delta=DELTA)
        got = []
        for _, state, executed in run(tx, gs * np.float32(factor), calls):
            got.append(bool(executed))
            assert np.isfinite([float(state.policy.mu), float(state.policy.var)]).all()
        assert got == want, factor


def test_registry_needs_total_steps():
    with pytest.raises(ValueError, match="`total_steps`"):
        registry.make_optimizer("ae_sam", optax.sgd(0.1))
    tx = registry.make_optimizer("ae_looksam", optax.sgd(0.1), total_steps=50)
    params = jnp.ones(3)
    loss = lambda p: jnp.sum(p**2)  # noqa: E731
    _, state = tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))
    assert int(state[0].probes) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"total_steps": 0}, "`total_steps`"),
        ({"total_steps": 10.0}, "`total_steps`"),
        ({"total_steps": 10, "delta": 1.0}, "`delta`"),
        ({"total_steps": 10, "lambda2": None}, "`lambda2`"),
        ({"total_steps": 10, "rho": -1.0}, "`rho`"),
    ],
)
@pytest.mark.parametrize("method", [sam_optax.ae_sam, sam_optax.ae_looksam])
def test_bad_arguments_are_named(method, kwargs, match):
    with pytest.raises(ValueError, match=match):
        method(**kwargs)
