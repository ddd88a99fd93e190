"""docs/guides/compositions.md: its code runs, and each leaf gets what the page says.

The expected values are computed in NumPy float64 from the page's equations, with the
gradient of its two-layer model written out by hand.
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

PAGE = pathlib.Path(__file__).parents[1] / "docs" / "guides" / "compositions.md"
RHO, LR = 0.05, 0.1


@pytest.fixture(scope="module")
def page():
    """The namespace after running every Python block of the page in order."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.DOTALL)
    assert len(blocks) == 6
    scope = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), scope)
    return scope


def np_grad(p, x, y):
    """The gradient of mean((tanh(x K) H + b - y)²) in float64, by the chain rule."""
    kernel, head, bias = (np.asarray(a, np.float64) for a in p)
    h = np.tanh(x @ kernel)
    dpred = 2.0 * (h @ head + bias - y) / y.size
    dh = dpred @ head.T
    return x.T @ (dh * (1.0 - h**2)), h.T @ dpred, dpred.sum(axis=0)


def flat(tree):
    return [
        np.asarray(tree["backbone"]["kernel"], np.float64),
        np.asarray(tree["head"]["kernel"], np.float64),
        np.asarray(tree["head"]["bias"], np.float64),
    ]


@pytest.fixture(scope="module")
def expected(page):
    x, y = (np.asarray(page[k], np.float64) for k in ("x", "y"))
    w = flat(page["params"])
    g = np_grad(w, x, y)
    e = RHO * g[0] / np.linalg.norm(g[0])
    probe = np_grad([w[0] + e, w[1], w[2]], x, y)
    return {
        "probe_rule": [-LR * probe[0], -LR * probe[1], -LR * probe[2]],
        "clean_rule": [-LR * probe[0], -LR * g[1], -LR * g[2]],
    }


@pytest.mark.parametrize(
    ("variable", "rule"),
    [("probe_rule", "probe_rule"), ("clean_rule", "clean_rule"), ("per_group", "clean_rule")],
)
def test_each_leaf_receives_what_the_table_says(page, expected, variable, rule):
    for got, want in zip(flat(page[variable]), expected[rule], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_without_full_params_the_method_says_what_to_do(page):
    tx = optax.chain(optax.masked(sam_optax.sam(RHO), page["backbone_only"]), optax.sgd(LR))
    with pytest.raises(ValueError, match=r"sam_optax\.sam sits inside optax\.masked.*full_params"):
        tx.update(page["grads"], tx.init(page["params"]), page["params"], grad_fn=page["grad_fn"])


def test_documented_clipping_bounds_what_reaches_the_base_optimizer():
    """After the method, clipping bounds the step; before it, the page's divergence."""
    loss = lambda p: 1e4 * jnp.sum((p - 3.0) ** 2)  # noqa: E731
    norms = {}
    for where, tx in {
        "after": optax.chain(sam_optax.sam(0.05), optax.clip_by_global_norm(1.0), optax.sgd(1.0)),
        "before": optax.chain(optax.clip_by_global_norm(1.0), sam_optax.sam(0.05), optax.sgd(1.0)),
    }.items():
        params, state, norms[where] = jnp.zeros(2), tx.init(jnp.zeros(2)), []
        for _ in range(3):
            updates, state = tx.update(
                jax.grad(loss)(params), state, params, grad_fn=jax.grad(loss)
            )
            params = optax.apply_updates(params, updates)
            norms[where].append(float(jnp.linalg.norm(updates)))
    np.testing.assert_allclose(norms["after"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(norms["before"], [8.6e4, 1.7e9, 3.4e13], rtol=0.01)


def test_clipping_inside_grad_fn_clips_both_gradients(page):
    """The page's last clipping recipe: ‖e‖ = rho and the probe gradient has norm <= 1."""
    seen = []

    def grad_fn(p):
        seen.append(p)
        return page["clipped"](jax.grad(page["loss"])(p))

    tx = optax.chain(sam_optax.sam(RHO), optax.identity())
    grads = page["clipped"](page["grads"])
    out, _ = tx.update(grads, tx.init(page["params"]), page["params"], grad_fn=grad_fn)
    assert float(optax.tree.norm(out)) <= 1.0 + 1e-6
    e = jax.tree.map(jnp.subtract, seen[0], page["params"])
    np.testing.assert_allclose(float(optax.tree.norm(e)), RHO, rtol=1e-5)


def test_lookahead_recipe_trains_the_fast_weights_with_probes(page):
    assert int(page["sharpness_state"].probes) == 10
    assert float(page["loss"](page["weights"].slow)) < float(page["loss"](page["params"]))
