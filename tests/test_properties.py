"""Property-based tests with hypothesis: every method on random pytrees and gradients.

Pytrees are nested dicts (optionally inside a tuple) of scalars, empty leaves and small
arrays, in float32, bfloat16, float16 or float64 (with x64 enabled), whose entries
include exact zeros and magnitudes from 1e-30 to 1e30 (capped where the dtype cannot
hold them). ``grad_fn`` returns ``1.5 g + (w_p - w)``, as large as the gradient, and
records ``w_p`` so that the norm each method promises can be measured in float64.

The examples are derandomized, so CI sees the same ones on every run. Runs are eager:
the few shapes are reused, and every method joins through ``test_common.METHODS``.
"""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_common import METHODS, RHO_ZERO_NOT_BASE

import sam_optax

EPS = 1e-12  # every method's default eps; test_common builds them without one
DTYPES = ["float32", "bfloat16", "float16", "float64"]
SHAPES = [(), (0,), (3,), (2, 3)]
MAGNITUDES = [0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30]
LARGEST = {"float16": 1e3}  # float16 holds 65504: keep w + e representable
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None)


def _measured(weights, x):
    return np.sqrt(sum(np.sum(s * np.square(v)) for s, v in zip(weights, x, strict=True)))


def _sam_norm(g, w, names, rho):
    """SAM: ‖e‖ = rho ‖g‖ / (‖g‖ + eps)."""
    del w, names
    norm = _measured([1.0] * len(g), g)
    return [np.ones_like(x) for x in g], rho * norm / (norm + EPS)


def _asam_norm(g, w, names, rho, eta=0.01):
    """ASAM: ‖e / T‖ = rho ‖T g‖ / (‖T g‖ + eps), T = |w| + eta (1 on biases)."""
    t = [
        np.ones_like(x) if n == "bias" else np.abs(v) + eta
        for x, v, n in zip(g, w, names, strict=True)
    ]
    norm = _measured([1.0] * len(g), [ti * x for ti, x in zip(t, g, strict=True)])
    return [1.0 / np.square(ti) for ti in t], rho * norm / (norm + EPS)


def _fisher_norm(g, w, names, rho, eta=1.0):
    """Fisher SAM: sqrt(eᵀ F e) = rho N / sqrt(N² + eps), F = 1 + eta g², N² = Σ g²/F."""
    del w, names
    f = [1.0 + eta * np.square(x) for x in g]
    norm = _measured([1.0 / fi for fi in f], g)
    return f, rho * norm / np.sqrt(norm**2 + EPS)


# The norm each method promises for e (methods built with test_common's defaults).
# A method that promises a norm joins here by one line; the others are checked for
# finiteness, structure, dtype and rho = 0 only.
NORMS = {"sam": _sam_norm, "asam": _asam_norm, "fisher_sam": _fisher_norm}


@st.composite
def problems(draw):
    """(dtype name, params, grads, mask or None, rho) as host NumPy float64 leaves."""
    dtype = draw(st.sampled_from(DTYPES))
    largest = LARGEST.get(dtype, np.inf)
    mags = st.sampled_from([m for m in MAGNITUDES if m <= largest])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spots = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["layer0", "layer1", None]), st.sampled_from(["kernel", "bias"])
            ),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )

    def leaf(shape):
        x = draw(mags) * rng.standard_normal(shape)
        return np.where(rng.random(shape) < 0.25, 0.0, x)  # exact zeros

    params, grads, mask = {}, {}, {}
    for group, name in spots:
        shape = draw(st.sampled_from(SHAPES))
        for tree, value in (
            (params, leaf(shape)),
            (grads, leaf(shape)),
            (mask, draw(st.booleans())),
        ):
            (tree.setdefault(group, {}) if group else tree)[name] = value
    wrap = draw(st.booleans())
    params, grads, mask = ((t,) if wrap else t for t in (params, grads, mask))
    mask = mask if draw(st.booleans()) else None
    rho = draw(st.sampled_from([0.05, 0.5, 2.0]))
    return dtype, params, grads, mask, rho


def _x64(dtype):
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def _as(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _f64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _leaf_names(tree):
    return [path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


names = pytest.mark.parametrize("name", sorted(METHODS))


def _large_probe(g, w_p, w):
    """The probe gradient ``1.5 g + e``: as large as ``g`` (to 1e30), so that inner
    products, projections and statistics meet magnitudes near 1e60 (a probe that
    returned ``e`` alone kept every product with ``g`` small)."""
    return (1.5 * g.astype(jnp.float32) + (w_p - w).astype(jnp.float32)).astype(g.dtype)


def _reuses_g_v(state):
    is_looksam = lambda x: isinstance(x, sam_optax.LookSAMState)  # noqa: E731
    return any(is_looksam(x) for x in jax.tree.leaves(state, is_leaf=is_looksam))


def _edge(dtype, w, g):
    """An explicit example: one kernel and one bias leaf with the given entries."""
    tree = lambda x: {"layer0": {"kernel": np.array(x), "bias": np.array(x[:1])}}  # noqa: E731
    return dtype, tree(w), tree(g), None, 0.5


# Overflow of T²g (ASAM) and of 1 + eta g² (Fisher SAM) once found here; zero weights
# let the probe see e exactly.
EDGES = [
    _edge("float32", [1e30, -1e30, 0.0], [1e30, 5e29, -1e30]),
    _edge("float32", [0.0, 0.0, 0.0], [1e30, -5e29, 0.0]),
    _edge("bfloat16", [0.0, 1e30, 0.0], [1e-30, 1e30, 1e30]),
    _edge("float32", [0.0, 0.0, 1e-30], [1e-30, 0.0, 1e-30]),
    _edge("float16", [0.0, 1e3, -1e3], [1e3, 0.0, -1e3]),
]


def _with_edges(test):
    for problem in EDGES:
        test = example(problem=problem)(test)
    return test


@pytest.mark.slow
# bSAM takes no mask, and its perturbation rho g / s is not normalised (the official
# code's): gradients near the dtype's largest value overflow it (tests/test_bsam.py).
@pytest.mark.parametrize("name", sorted(set(METHODS) - {"bsam"}))
@SETTINGS
@_with_edges
@given(problem=problems())
def test_finite_structure_dtype_and_promised_norm(name, problem):
    dtype, params, grads, mask, rho = problem
    with _x64(dtype):
        params, grads = _as(params, dtype), _as(grads, dtype)
        chex.assert_tree_all_finite((params, grads))
        probes = []

        def grad_fn(w_p):
            jax.debug.callback(probes.append, w_p)
            return jax.tree.map(_large_probe, grads, w_p, params)

        tx = METHODS[name](rho, optax.identity(), mask=mask)
        state = tx.init(params)
        out, new_state = tx.update(grads, state, params, grad_fn=grad_fn)

        chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
        chex.assert_tree_all_finite((out, new_state))
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        if _reuses_g_v(new_state):  # LookSAM's next skipped step reuses the stored g_v
            out, _ = tx.update(grads, new_state, params, grad_fn=grad_fn)
            chex.assert_tree_all_finite(out)
        if name not in NORMS or not probes:
            return
        (w_p,) = probes
        flags = [True] * len(jax.tree.leaves(params)) if mask is None else jax.tree.leaves(mask)
        w, w_p = _f64(params), _f64(w_p)
        g = [x if keep else np.zeros_like(x) for x, keep in zip(_f64(grads), flags, strict=True)]
        e = [b - a for a, b in zip(w, w_p, strict=True)]
        for x, keep in zip(e, flags, strict=True):
            if not keep:
                np.testing.assert_array_equal(x, 0.0)  # a masked leaf is not perturbed
        weights, expected = NORMS[name](g, w, _leaf_names(params), rho)
        # w + e was summed in float32 (or float64) and rounded to the params' dtype.
        ulp = float(jnp.finfo(dtype).eps)
        slack = _measured(weights, [ulp * np.abs(x) for x in w_p])
        np.testing.assert_allclose(
            _measured(weights, e), expected, rtol=1e-4, atol=slack + 1e-6 * rho
        )


@pytest.mark.parametrize("name", sorted(set(METHODS) - set(RHO_ZERO_NOT_BASE)))
@SETTINGS
@_with_edges
@given(problem=problems())
def test_rho_zero_is_identity(name, problem):
    dtype, params, grads, mask, _ = problem
    with _x64(dtype):
        params, grads = _as(params, dtype), _as(grads, dtype)

        def grad_fn(w_p):  # whatever a method does with it must not reach the output
            return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), w_p)

        tx = METHODS[name](0.0, optax.identity(), mask=mask)
        out, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
        chex.assert_trees_all_equal(out, grads, strict=True)
