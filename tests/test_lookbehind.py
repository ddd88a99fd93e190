"""Lookbehind-SAM against docs/methods/multistep.md in NumPy float64."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from geometry_reference import LR, assert_close, dot, loss, make_params, norm, np_grad, run

import sam_optax
from sam_optax import registry

MOMENTUM = 0.5


def _climb(ps, g, rho, eta):
    """One ascent step from ``ps``: SAM's, or ASAM's with T = |p| + eta on kernel and scale."""
    if eta is None:
        t = [np.ones_like(p) for p in ps]
    else:  # leaves sorted: bias (T = 1), kernel and scale (weights)
        t = [np.ones_like(ps[0]), np.abs(ps[1]) + eta, np.abs(ps[2]) + eta]
    n = norm([a * b for a, b in zip(t, g, strict=True)])
    return [p + rho * a * a * b / (n + 1e-12) for p, a, b in zip(ps, t, g, strict=True)]


def reference(steps, rho, k, alpha, eta=None):
    """Slow weights w, fast weights f, perturbed point p; SGD with momentum on f."""
    ws = [np.asarray(x, np.float64) for x in jax.tree.leaves(make_params())]
    m = [np.zeros_like(w) for w in ws]
    out = []
    for _ in range(steps):
        p, f, g = ws, ws, np_grad(ws)
        for i in range(k):
            p = _climb(p, g, rho, eta)
            g = np_grad(p)
            m = [x + MOMENTUM * y for x, y in zip(g, m, strict=True)]
            f = [a - LR * b for a, b in zip(f, m, strict=True)]
            if i == 0:
                f_1 = f
        moved = [a - b for a, b in zip(f, ws, strict=True)]
        if alpha is None:
            first = [a - b for a, b in zip(f_1, ws, strict=True)]
            pairs = zip(first, moved, strict=True)
            a = [(1 + dot([x], [y]) / (norm([x]) * norm([y]))) / 2 for x, y in pairs]
        else:
            a = [alpha] * len(ws)
        ws = [w + c * d for w, c, d in zip(ws, a, moved, strict=True)]
        out.append(ws)
    return out, m


def _tx(**kwargs):
    return sam_optax.lookbehind_sam(optax.sgd(LR, momentum=MOMENTUM), **kwargs)


@pytest.mark.parametrize(
    ("k", "alpha", "eta"), [(3, None, None), (2, 0.5, None), (2, None, 0.01)], ids=str
)
def test_steps_match_numpy_with_a_momentum_base(k, alpha, eta):
    perturbation = "normalized" if eta is None else "adaptive"
    theirs, momentum = reference(4, 0.1, k, alpha, eta)
    ours, state = run(_tx(rho=0.1, k=k, alpha=alpha, perturbation=perturbation, eta=eta or 0.01), 4)
    assert_close(ours, theirs)
    assert int(state.count) == 4
    assert_close([jax.tree.leaves(state.base)], [momentum])  # the carried momentum


def _scalar(k, alpha, rho=0.1):
    """f = w² / 2 at w = 1 under SGD with lr 0.1; the new w and the probed points."""
    seen = []

    def grad_fn(w):
        jax.debug.callback(lambda x: seen.append(float(x)), w)
        return w

    tx = sam_optax.lookbehind_sam(optax.sgd(0.1), rho=rho, k=k, alpha=alpha)
    w = jnp.asarray(1.0)
    updates, _ = tx.update(w, tx.init(w), w, grad_fn=grad_fn)
    jax.effects_barrier()
    return float(w + updates), seen


def test_published_numbers_on_a_scalar():
    new, probes = _scalar(2, 0.5)
    assert new == pytest.approx(0.885, abs=1e-6)
    assert probes == pytest.approx([1.1, 1.2], abs=1e-6)  # the ascent accumulates
    assert _scalar(2, 1.0)[0] == pytest.approx(0.77, abs=1e-6)  # the fast weights
    assert _scalar(1, 1.0)[0] == pytest.approx(0.89, abs=1e-6)  # SAM


def test_k_one_adaptive_is_sam_exactly():
    base = optax.sgd(LR, momentum=MOMENTUM)
    ours, _ = run(sam_optax.lookbehind_sam(base, rho=0.1, k=1), 3)
    sam, _ = run(optax.chain(sam_optax.sam(rho=0.1), base), 3)
    chex.assert_trees_all_equal(ours, sam)


def test_rho_zero_with_k_two_is_two_base_steps_along_g_then_the_look_back():
    """The documented exception to `rho = 0 gives the base optimizer`."""
    ws = [np.asarray(x, np.float64) for x in jax.tree.leaves(make_params())]
    g = np_grad(ws)
    m1 = g
    m2 = [a + MOMENTUM * b for a, b in zip(g, m1, strict=True)]
    want = [w - 0.5 * LR * (a + b) for w, a, b in zip(ws, m1, m2, strict=True)]
    ours, _ = run(_tx(rho=0.0, k=2, alpha=0.5), 1)
    assert_close(ours, [want])


def test_grad_fn_is_called_k_times_per_step():
    calls = []

    def grad_fn(p):
        calls.append(1)
        return jax.grad(loss)(p)

    params = make_params()
    tx = _tx(k=3)
    tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=grad_fn)
    assert len(calls) == 3


def test_registry_steps_the_schedule_k_times_per_step():
    assert registry.METHODS["lookbehind_sam"].base_steps({"k": 3}) == 3


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"k": 0}, "k"),
        ({"k": 1.5}, "k"),
        ({"alpha": 1.5}, "alpha"),
        ({"perturbation": "asam"}, "perturbation"),
        ({"eta": -1.0, "perturbation": "adaptive"}, "eta"),
        ({"rho": -0.1}, "rho"),
    ],
)
def test_bad_arguments_are_named(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        _tx(**kwargs)
    with pytest.raises(ValueError, match="`base_optimizer`"):
        sam_optax.lookbehind_sam("sgd")
