"""WSAM, coupled and decoupled, against docs/methods/geometry.md in NumPy float64."""

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
    make_params,
    normalized,
    np_grad,
    reference_trajectory,
    to_np,
    trajectory,
)

import sam_optax
from sam_optax import registry


def _sharpness(ws, g, rho):
    """``g_p - g`` with SAM's perturbation."""
    g_p = np_grad([w + d for w, d in zip(ws, normalized(g, rho), strict=True)])
    return [b - a for a, b in zip(g, g_p, strict=True)]


def test_coupled_one_step_matches_numpy():
    alpha = 0.8 / 0.2

    def direction(ws, g, t):
        return [a + alpha * s for a, s in zip(g, _sharpness(ws, g, 0.1), strict=True)]

    tx = optax.chain(sam_optax.wsam(rho=0.1, gamma=0.8), optax.sgd(LR))
    assert_close(trajectory(tx, 1), reference_trajectory(direction, 1))


def test_coupled_gamma_half_is_sam():
    ours = trajectory(optax.chain(sam_optax.wsam(rho=0.1, gamma=0.5), optax.sgd(LR)), 4)
    sam = trajectory(optax.chain(sam_optax.sam(rho=0.1), optax.sgd(LR)), 4)
    chex.assert_trees_all_close(ours, sam, rtol=1e-6, atol=1e-7)


def _decoupled_reference(lr_of_t, rho, gamma, steps, momentum=0.9):
    """SGD with momentum on g, plus ``-lr_t * alpha * (g_p - g)``, by hand."""
    alpha = gamma / (1.0 - gamma)
    ws = to_np(make_params())
    trace = [np.zeros_like(w) for w in ws]
    out = []
    for t in range(steps):
        g = np_grad(ws)
        s = _sharpness(ws, g, rho)
        trace = [x + momentum * m for x, m in zip(g, trace, strict=True)]
        ws = [
            w - lr_of_t(t) * m - lr_of_t(t) * alpha * d
            for w, m, d in zip(ws, trace, s, strict=True)
        ]
        out.append(ws)
    return out


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant_lr", "scheduled_lr"])
def test_decoupled_matches_hand_computation(scheduled):
    if scheduled:
        lr = optax.linear_schedule(0.08, 0.02, 3)
        lr_np = lambda t: 0.08 - 0.06 * min(t, 3) / 3  # noqa: E731
    else:
        lr, lr_np = 0.05, (lambda t: 0.05)
    tx = sam_optax.wsam_decoupled(optax.sgd(lr, momentum=0.9), lr, rho=0.1, gamma=0.9)
    assert_close(trajectory(tx, 4), _decoupled_reference(lr_np, 0.1, 0.9, 4), rtol=5e-5)


def test_decoupled_gamma_zero_is_base_optimizer():
    base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
    ours = trajectory(sam_optax.wsam_decoupled(base(), LR, rho=0.1, gamma=0.0), 3)
    theirs = trajectory(optax.with_extra_args_support(base()), 3)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)  # fusion may differ by an ulp


def test_registry_builds_decoupled_with_the_learning_rate():
    lr = optax.constant_schedule(0.05)
    tx = registry.make_optimizer("wsam", optax.sgd(lr, momentum=0.9), learning_rate=lr)
    direct = sam_optax.wsam_decoupled(optax.sgd(lr, momentum=0.9), lr, rho=0.05, gamma=0.9)
    chex.assert_trees_all_equal(trajectory(tx, 2), trajectory(direct, 2))
    with pytest.raises(ValueError, match="`learning_rate` must be a number or an optax schedule"):
        registry.make_optimizer("wsam", optax.sgd(0.1))


@pytest.mark.parametrize("gamma", [1.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("make", ["wsam", "wsam_decoupled"])
def test_gamma_outside_unit_interval_is_rejected(make, gamma):
    with pytest.raises(ValueError, match=r"`gamma` must lie in \[0.0, 1.0\), got"):
        if make == "wsam":
            sam_optax.wsam(gamma=gamma)
        else:
            sam_optax.wsam_decoupled(optax.sgd(0.1), 0.1, gamma=gamma)


def test_decoupled_bad_arguments():
    with pytest.raises(ValueError, match="`base_optimizer` must be an optax"):
        sam_optax.wsam_decoupled(0.1, 0.1)
    with pytest.raises(ValueError, match=r"`learning_rate` must lie in \[0.0, inf\], got -0.1"):
        sam_optax.wsam_decoupled(optax.sgd(0.1), -0.1)
    with pytest.raises(ValueError, match=r"`rho` must lie in \[0.0, inf\], got -1"):
        sam_optax.wsam_decoupled(optax.sgd(0.1), 0.1, rho=-1)


def test_decoupled_axis_name_averages_the_clean_gradient_and_the_term():
    shifts = jnp.array([0.0, 0.5])
    params = jnp.array([0.3, -1.2])

    def local_loss(p, s):
        return jnp.sum((p - s) ** 4)

    tx = sam_optax.wsam_decoupled(optax.sgd(0.1), 0.1, rho=0.2, gamma=0.75, axis_name="d")

    def device(s):
        grad_fn = lambda p: jax.grad(local_loss)(p, s)  # noqa: E731
        return tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]

    ours = jax.jit(jax.vmap(device, axis_name="d"))(shifts)
    w = np.asarray(params, np.float64)
    gs, terms = [], []
    for s in np.asarray(shifts, np.float64):
        g = 4 * (w - s) ** 3
        g_p = 4 * (w + 0.2 * g / np.linalg.norm(g) - s) ** 3
        gs.append(g)
        terms.append(3.0 * (g_p - g))
    want = -0.1 * np.mean(gs, axis=0) - 0.1 * np.mean(terms, axis=0)
    for row in np.asarray(ours):
        np.testing.assert_allclose(row, want, rtol=1e-5)
