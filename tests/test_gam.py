"""GAM against docs/methods/multistep.md in NumPy float64, and the skeleton's further probes."""

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
    dot,
    loss,
    make_params,
    norm,
    normalized,
    np_grad,
    reference_trajectory,
    run,
    trajectory,
)

import sam_optax


def _add(*trees):
    return [sum(parts) for parts in zip(*trees, strict=True)]


def _gam_direction(rho, rho_prime, alpha, beta, gamma, h_minus):
    """The accelerated GAM step, written from the equations of the docs page."""

    def direction(ws, g, t):
        del t
        g_1 = np_grad(_add(ws, normalized(g, rho_prime)))
        e_2 = normalized([a - b for a, b in zip(g_1, g, strict=True)], rho)
        g_2 = np_grad(_add(ws, e_2))
        g_3 = np_grad(_add(ws, e_2, normalized(g_2, rho_prime)))
        h_plus = [alpha * a + (1 - alpha) * b for a, b in zip(g_1, g_3, strict=True)]
        if h_minus == "code":
            h_low = [a + abs(1 - beta) * b for a, b in zip(g, g_2, strict=True)]
        else:
            h_low = [beta * a + (1 - beta) * b for a, b in zip(g, g_2, strict=True)]
        coef = dot(h_low, h_plus) / (norm(h_plus) ** 2 + 1e-12)
        return [p - gamma * (m - coef * p) for p, m in zip(h_plus, h_low, strict=True)]

    return direction


ARGS = {"rho": 0.3, "rho_prime": 0.1, "alpha": 0.4, "beta": 0.3, "gamma": 0.2}


@pytest.mark.parametrize("h_minus", ["code", "paper"])
def test_five_steps_match_numpy(h_minus):
    theirs = reference_trajectory(_gam_direction(**ARGS, h_minus=h_minus), 5)
    ours, state = run(optax.chain(sam_optax.gam(**ARGS, h_minus=h_minus), optax.sgd(LR)), 5)
    assert_close(ours, theirs)
    assert int(state[0].count) == int(state[0].probes) == 5


def test_defaults_match_numpy_with_momentum():
    """The official CIFAR-10 defaults, under SGD with momentum (NumPy's own momentum)."""
    direction = _gam_direction(0.2, 0.03, 0.1, 0.1, 0.05, "code")
    ws, m = [np.asarray(x, np.float64) for x in jax.tree.leaves(make_params())], None
    theirs = []
    for t in range(4):
        d = direction(ws, np_grad(ws), t)
        m = d if m is None else [x + 0.9 * y for x, y in zip(d, m, strict=True)]
        ws = [w - LR * x for w, x in zip(ws, m, strict=True)]
        theirs.append(ws)
    ours = trajectory(optax.chain(sam_optax.gam(), optax.sgd(LR, momentum=0.9)), 4)
    assert_close(ours, theirs)


def _quadratic():
    grad = jax.grad(lambda w: 0.5 * (w[0] ** 2 + 4.0 * w[1] ** 2))
    return grad, jnp.ones(2)


def _out(tx, grad_fn=None):
    grad, w = _quadratic()
    grad_fn = grad if grad_fn is None else grad_fn
    return tx.update(grad(w), tx.init(w), w, grad_fn=grad_fn)[0]


FACT = {"rho": 0.2, "rho_prime": 0.1, "alpha": 0.5, "beta": 0.5, "gamma": 0.1}


@pytest.mark.parametrize(
    ("h_minus", "want"), [("paper", [1.022831, 4.790199]), ("code", [1.016103, 4.791644])]
)
def test_published_numbers_on_a_quadratic(h_minus, want):
    np.testing.assert_allclose(_out(sam_optax.gam(**FACT, h_minus=h_minus)), want, atol=2e-6)


def test_rho_and_gamma_zero_is_sam_with_radius_rho_prime():
    out = _out(sam_optax.gam(**{**FACT, "rho": 0.0, "gamma": 0.0}))
    np.testing.assert_allclose(out, [1.024254, 4.388057], atol=2e-6)
    np.testing.assert_allclose(out, _out(sam_optax.sam(rho=0.1)), rtol=1e-6)


@pytest.mark.parametrize(("h_minus", "scale"), [("paper", 1.0), ("code", 2.0 - 0.5)])
def test_rho_zero_is_gsam(h_minus, scale):
    out = _out(sam_optax.gam(**{**FACT, "rho": 0.0}, h_minus=h_minus))
    want = _out(sam_optax.gsam(rho=0.1, alpha=scale * 0.1))
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_rho_prime_zero_is_the_clean_gradient_exactly(rho):
    grad, w = _quadratic()
    calls = []
    out = _out(sam_optax.gam(**{**FACT, "rho": rho, "rho_prime": 0.0}), lambda p: calls.append(1))
    chex.assert_trees_all_equal(out, grad(w))
    assert not calls  # the skeleton's radius is rho_prime: nothing is probed


def test_three_probes_per_step_through_the_probe_hook():
    """The further probes take the skeleton's path: here the `probe=` hook, not grad_fn."""
    grad, w = _quadratic()
    seen = []

    def hook(w_p, ctx):
        seen.append(ctx.count)
        return grad(w_p)

    piece = sam_optax.gradient_norm_aware(**{k: v for k, v in FACT.items() if k != "rho_prime"})
    tx = sam_optax.sharpness_aware(sam_optax.normalized_gradient(), piece, rho=0.1, probe=hook)
    out, _ = tx.update(grad(w), tx.init(w), w)
    assert len(seen) == 3
    np.testing.assert_allclose(out, [1.016103, 4.791644], atol=2e-6)


def test_a_combine_cannot_take_more_probes_than_it_declares():
    def combine(g, g_p, state, ctx):
        return ctx.evaluate(ctx.evaluate(g_p)), state

    greedy = sam_optax.Combine(lambda p: optax.EmptyState(), combine, lambda g, s, c: (g, s), 1)
    tx = sam_optax.sharpness_aware(sam_optax.normalized_gradient(), greedy, rho=0.1)
    grad, w = _quadratic()
    with pytest.raises(ValueError, match=r"more than the 1 further probe"):
        tx.update(grad(w), tx.init(w), w, grad_fn=grad)


def test_a_combine_without_further_probes_gets_no_oracle():
    def combine(g, g_p, state, ctx):
        assert ctx.evaluate is None
        return g_p, state

    plain = sam_optax.Combine(lambda p: optax.EmptyState(), combine, lambda g, s, c: (g, s))
    grad, w = _quadratic()
    tx = sam_optax.sharpness_aware(sam_optax.normalized_gradient(), plain, rho=0.1)
    tx.update(grad(w), tx.init(w), w, grad_fn=grad)


def test_a_skipped_step_returns_the_clean_gradient():
    grad, w = _quadratic()
    tx = sam_optax.gam(**FACT, policy=sam_optax.policies.every(2))
    state = tx.init(w)
    _, state = tx.update(grad(w), state, w, grad_fn=grad)  # step 0 probes
    out, state = tx.update(grad(w), state, w, grad_fn=grad)
    chex.assert_trees_all_equal(out, grad(w))
    assert int(state.probes) == 1


def test_mask_leaves_descend_along_h_plus():
    """A leaf outside the mask is not perturbed and takes no part in the decomposition."""
    params = make_params()
    mask = {"bias": True, "kernel": True, "scale": False}
    tx = sam_optax.gam(**ARGS, mask=mask)
    out, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))
    ws = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    keep = [1.0, 1.0, 0.0]
    g = np_grad(ws)
    masked = lambda xs: [k * x for k, x in zip(keep, xs, strict=True)]  # noqa: E731
    g_1 = np_grad(_add(ws, normalized(masked(g), 0.1)))
    e_2 = normalized(masked([a - b for a, b in zip(g_1, g, strict=True)]), 0.3)
    g_2 = np_grad(_add(ws, e_2))
    g_3 = np_grad(_add(ws, e_2, normalized(masked(g_2), 0.1)))
    h_plus = [0.4 * a + 0.6 * b for a, b in zip(g_1, g_3, strict=True)]
    h_low = [a + 0.7 * b for a, b in zip(g, g_2, strict=True)]
    coef = dot(masked(h_low), masked(h_plus)) / (norm(masked(h_plus)) ** 2 + 1e-12)
    want = [p - 0.2 * k * (m - coef * p) for p, m, k in zip(h_plus, h_low, keep, strict=True)]
    for a, b in zip(jax.tree.leaves(out), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"rho": -0.1}, "rho"),
        ({"rho_prime": -0.1}, "rho_prime"),
        ({"alpha": 1.5}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"gamma": -1.0}, "gamma"),
        ({"h_minus": "both"}, "h_minus"),
    ],
)
def test_bad_arguments_are_named(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        sam_optax.gam(**kwargs)


def test_negative_probes_are_rejected():
    bad = sam_optax.probe_gradient()._replace(probes=-1)
    with pytest.raises(ValueError, match=r"`combine.probes`"):
        sam_optax.sharpness_aware(sam_optax.normalized_gradient(), bad, rho=0.1)
