"""GSAM against docs/methods/geometry.md in NumPy float64, its reductions, and its rho schedule."""

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
    norm,
    normalized,
    np_grad,
    reference_trajectory,
    trajectory,
)

import sam_optax


def _gsam_direction(rho_of_t, alpha, keep=None, eps=1e-12):
    def direction(ws, g, t):
        flags = [True] * len(ws) if keep is None else keep
        g_m = [x if k else np.zeros_like(x) for x, k in zip(g, flags, strict=True)]
        e = normalized(g_m, rho_of_t(t))
        g_p = np_grad([w + d for w, d in zip(ws, e, strict=True)])
        g_p_m = [x if k else np.zeros_like(x) for x, k in zip(g_p, flags, strict=True)]
        coef = dot(g_m, g_p_m) / (norm(g_p_m) ** 2 + eps)
        g_perp = [a - coef * b for a, b in zip(g_m, g_p_m, strict=True)]
        return [b - alpha * c for b, c in zip(g_p, g_perp, strict=True)]

    return direction


def test_two_steps_match_numpy():
    tx = optax.chain(sam_optax.gsam(rho=0.1, alpha=0.4), optax.sgd(LR))
    theirs = reference_trajectory(_gsam_direction(lambda t: 0.1, 0.4), 2)
    assert_close(trajectory(tx, 2), theirs)


def test_scheduled_rho_with_mask_matches_numpy():
    """The schedule is read at each step; the decomposition lives on the masked leaves."""
    lr = optax.linear_schedule(0.1, 0.02, 3)
    rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.2, rho_min=0.05, lr_max=0.1, lr_min=0.02)
    mask = {"bias": True, "kernel": True, "scale": False}
    tx = optax.chain(sam_optax.gsam(rho=rho, alpha=0.6, mask=mask), optax.sgd(LR))
    rho_np = lambda t: 0.05 + 0.15 * (max(0.1 - 0.08 * t / 3, 0.02) - 0.02) / 0.08  # noqa: E731
    theirs = reference_trajectory(_gsam_direction(rho_np, 0.6, keep=[True, True, False]), 3)
    assert_close(trajectory(tx, 3), theirs)


def test_alpha_zero_is_sam():
    ours = trajectory(optax.chain(sam_optax.gsam(rho=0.1, alpha=0.0), optax.sgd(LR)), 4)
    sam = trajectory(optax.chain(sam_optax.sam(rho=0.1), optax.sgd(LR)), 4)
    chex.assert_trees_all_equal(ours, sam)


def test_rho_schedule_follows_lr_and_is_never_negative():
    lr = optax.warmup_cosine_decay_schedule(0.0, 0.4, 50, 500, end_value=0.04)
    rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.3, rho_min=0.02, lr_max=0.4, lr_min=0.04)
    steps = np.arange(0, 501)
    ours = np.asarray(jax.jit(rho)(jnp.asarray(steps)))
    lrs = np.asarray(lr(jnp.asarray(steps)), np.float64)
    line = 0.02 + (0.3 - 0.02) * (lrs - 0.04) / (0.4 - 0.04)
    assert (line[:2] < 0).all()  # the unclamped line goes negative early in the warm-up
    assert (ours >= 0).all()
    np.testing.assert_allclose(ours, np.maximum(line, 0.0), rtol=1e-5, atol=1e-7)
    assert ours[50] == pytest.approx(0.3) and ours[500] == pytest.approx(0.02)


def test_rho_schedule_with_flat_lr_is_rho_max():
    rho = sam_optax.gsam_rho_schedule(0.1, rho_max=0.05, rho_min=0.01, lr_max=0.1, lr_min=0.1)
    assert float(rho(jnp.asarray(7))) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": -0.1}, r"`alpha` must lie in \[0.0, inf\], got -0.1"),
        ({"rho": -0.05}, r"`rho` must lie in \[0.0, inf\], got -0.05"),
        ({"alpha": "big"}, r"`alpha` must be a number or an optax schedule"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.gsam(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho_max": -0.1}, r"`rho_max` must lie in \[0.0, inf\], got -0.1"),
        ({"rho_min": -0.1}, r"`rho_min` must lie in \[0.0, inf\], got -0.1"),
        ({"lr_max": 0.01}, r"`lr_max` must lie in \[0.02, inf\], got 0.01"),
        ({"lr_min": -1.0}, r"`lr_min` must lie in \[0.0, inf\], got -1.0"),
        ({"lr_max": jnp.asarray(0.1)}, r"`lr_max` must be a number"),
        ({"lr_schedule": "cosine"}, r"`lr_schedule` must be a number or an optax schedule"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    args = {
        "lr_schedule": optax.constant_schedule(0.1),
        "rho_max": 0.1,
        "rho_min": 0.01,
        "lr_max": 0.1,
        "lr_min": 0.02,
    }
    with pytest.raises(ValueError, match=match):
        sam_optax.gsam_rho_schedule(**{**args, **kwargs})


def test_axis_name_averages_the_per_device_decomposition():
    """Each device decomposes its own (g, g_p); the outputs are then averaged."""
    shifts = jnp.array([0.0, 0.7, -0.4])
    params = {"w": jnp.array([0.3, -1.2, 0.8])}

    def local_loss(p, s):
        return jnp.sum((p["w"] - s) ** 4) + jnp.sum(p["w"] * s)

    tx = sam_optax.gsam(rho=0.2, alpha=0.5, axis_name="d")

    def device(s):
        grad_fn = lambda p: jax.grad(local_loss)(p, s)  # noqa: E731
        return tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)[0]["w"]

    ours = jax.jit(jax.vmap(device, axis_name="d"))(shifts)
    w = np.asarray(params["w"], np.float64)
    outs = []
    for s in np.asarray(shifts, np.float64):
        grad = lambda v, s=s: 4 * (v - s) ** 3 + s  # noqa: E731
        g = grad(w)
        g_p = grad(w + 0.2 * g / np.linalg.norm(g))
        g_perp = g - (g @ g_p) / (g_p @ g_p) * g_p
        outs.append(g_p - 0.5 * g_perp)
    for row in np.asarray(ours):
        np.testing.assert_allclose(row, np.mean(outs, axis=0), rtol=1e-5)
