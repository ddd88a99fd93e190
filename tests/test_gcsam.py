"""GCSAM against docs/methods/geometry.md in NumPy float64, and the facts of its section."""

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
    norm,
    np_grad,
    reference_trajectory,
    run,
    trajectory,
)

import sam_optax
from sam_optax.pieces import Context

KERNEL = 1  # leaves sorted: bias (4,), kernel (3, 4), scale ()


def _np_gc(xs):
    """GC of the kernel over its input axis (0); the other leaves unchanged."""
    return [x - x.mean(axis=0, keepdims=True) if i == KERNEL else x for i, x in enumerate(xs)]


def _gcsam_direction(rho, raw=False, descent=True):
    def direction(ws, g, t):
        c = _np_gc(g)
        scale = rho / ((norm(g) if raw else norm(c)) + 1e-12)
        g_p = np_grad([w + scale * x for w, x in zip(ws, c, strict=True)])
        return _np_gc(g_p) if descent else g_p

    return direction


@pytest.mark.parametrize(
    "kwargs, raw, descent",
    [({}, False, True), ({"norm": "raw", "centralize_descent": False}, True, False)],
    ids=["paper", "pytorch_optimizer"],
)
def test_five_steps_match_numpy(kwargs, raw, descent):
    theirs = reference_trajectory(_gcsam_direction(0.1, raw, descent), 5)
    ours, state = run(optax.chain(sam_optax.gcsam(rho=0.1, **kwargs), optax.sgd(LR)), 5)
    assert_close(ours, theirs)
    assert int(state[0].count) == 5 and int(state[0].probes) == 5


def test_the_forms_differ_where_they_should():
    """The paper's and pytorch_optimizer's forms are not the same trajectory."""
    paper = trajectory(optax.chain(sam_optax.gcsam(rho=0.1), optax.sgd(LR)), 2)
    port = trajectory(
        optax.chain(sam_optax.gcsam(rho=0.1, norm="raw", centralize_descent=False), optax.sgd(LR)),
        2,
    )
    assert not np.allclose(paper[-1][KERNEL], port[-1][KERNEL])


@pytest.mark.parametrize("norm_, root", [("centralized", 10.0), ("raw", 50.0)])
def test_the_kernel_of_the_section(norm_, root):
    """Flax kernel [[1, 2], [3, 6]] ([in, out]): GC = [[-1, -2], [1, 2]], e = GC / √10 or √50."""
    g = {"kernel": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
    np.testing.assert_array_equal(sam_optax.centralize(g)["kernel"], [[-1.0, -2.0], [1.0, 2.0]])
    piece = sam_optax.centralized_gradient(norm=norm_)
    e, _ = piece.perturb(g, piece.init(g), Context(None, 0, 1.0, 1e-12, None, {}))
    np.testing.assert_allclose(e["kernel"], np.array([[-1, -2], [1, 2]]) / np.sqrt(root), rtol=1e-6)


def test_e_sums_to_zero_over_the_reduced_axes():
    g = {"conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 2, 5))}}
    piece = sam_optax.centralized_gradient()
    e, _ = piece.perturb(g, piece.init(g), Context(None, 0, 0.5, 1e-12, None, {}))
    np.testing.assert_allclose(jnp.sum(e["conv"]["kernel"], axis=(0, 1, 2)), 0.0, atol=1e-6)
    assert float(jnp.linalg.norm(e["conv"]["kernel"])) == pytest.approx(0.5, rel=1e-5)


def test_a_model_of_1d_leaves_is_sam():
    params = {"bias": make_params()["bias"], "w": jnp.array([0.3, -0.7, 1.1])}
    loss = lambda p: jnp.sum(p["bias"] ** 4) + jnp.sum(jnp.cos(p["w"]))  # noqa: E731
    outs = []
    for method in (sam_optax.gcsam(rho=0.1), sam_optax.sam(rho=0.1)):
        tx = optax.chain(method, optax.sgd(LR))
        state, p = tx.init(params), params
        for _ in range(3):
            u, state = tx.update(jax.grad(loss)(p), state, p, grad_fn=jax.grad(loss))
            p = optax.apply_updates(p, u)
        outs.append(p)
    chex.assert_trees_all_equal(*outs)


def test_axes_override_and_default_rule():
    params = {"embed": {"embedding": jnp.ones((5, 3))}, "dense": {"kernel": jnp.ones((4, 2))}}
    g = jax.tree.map(lambda x: jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape), params)
    default = sam_optax.centralize(g)
    chex.assert_trees_all_equal(default["embed"], g["embed"])  # embeddings are left alone
    every = sam_optax.centralize(g, axes=lambda path, x: tuple(range(x.ndim - 1)))
    np.testing.assert_allclose(jnp.sum(every["embed"]["embedding"], axis=0), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="`axes` must return None or a non-empty tuple"):
        sam_optax.centralize(g, axes=lambda path, x: (5,))


def test_skipped_step_returns_the_clean_gradient():
    params = make_params()
    grads = jax.tree.map(lambda x: x + 1.0, params)
    tx = sam_optax.gcsam(rho=0.1, policy=sam_optax.policies.every(2))
    state = tx.init(params)
    _, state = tx.update(grads, state, params, grad_fn=lambda p: grads)
    out, _ = tx.update(grads, state, params, grad_fn=lambda p: grads)
    chex.assert_trees_all_equal(out, grads)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "mean"}, r"`norm` must be one of \('centralized', 'raw'\), got 'mean'"),
        ({"axes": (0,)}, r"`axes` must be a function"),
        ({"centralize_descent": 1}, r"`centralize_descent` must be True or False, got 1"),
        ({"rho": -0.1}, r"`rho` must lie in"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.gcsam(**kwargs)
