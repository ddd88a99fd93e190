"""Equinox models with a sharpness-aware chain, as docs/guides/equinox.md trains them.

The page runs as written; its plain step is then checked against SAM + SGD with momentum
in NumPy float64 on a linear model, and its BatchNorm-and-dropout step against the
documented SAM step: the probe at w + rho g / ||g|| uses the state from before the step
and the step's dropout key, and only the clean pass's BatchNorm state is kept.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from docs_pages import DOCS, run_page

PAGE = "guides/equinox.md"
RHO, LR, MOMENTUM = 0.05, 0.05, 0.9  # the page's tx


@pytest.fixture(scope="module")
def page():
    with pytest.MonkeyPatch.context() as mp:
        yield run_page(DOCS / PAGE, mp)


def numpy_sam_sgd(w, b, x, y, steps):
    """SAM (rho) + SGD with momentum on mean((x w^T + b - y)^2), float64."""
    vw, vb = np.zeros_like(w), np.zeros_like(b)

    def grad(w, b):
        r = (x @ w.T + b)[:, 0] - y
        return 2 * r[None, :] @ x / len(y), 2 * r.sum(keepdims=True) / len(y)

    for _ in range(steps):
        gw, gb = grad(w, b)
        norm = np.sqrt(np.sum(gw**2) + np.sum(gb**2))
        pw, pb = grad(w + RHO * gw / norm, b + RHO * gb / norm)
        vw, vb = pw + MOMENTUM * vw, pb + MOMENTUM * vb
        w, b = w - LR * vw, b - LR * vb
    return w, b


def test_the_page_trains_both_models(page):
    assert float(page.loss) < 0.5  # the classifier, after 100 steps
    assert float(jnp.mean(page.logits.argmax(-1) == page.labels)) > 0.9


def test_plain_step_is_numpy_float64_sam(page):
    model = eqx.nn.Linear(8, 1, key=jax.random.key(3))
    opt_state = page.tx.init(eqx.filter(model, eqx.is_inexact_array))
    for _ in range(3):
        model, opt_state, _ = page.train_step(model, opt_state, page.x, page.y)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    w, b = numpy_sam_sgd(
        f64(eqx.nn.Linear(8, 1, key=jax.random.key(3)).weight),
        f64(eqx.nn.Linear(8, 1, key=jax.random.key(3)).bias),
        f64(page.x),
        f64(page.y),
        steps=3,
    )
    np.testing.assert_allclose(model.weight, w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.bias, b, rtol=1e-4, atol=1e-6)


def largest_difference(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - v))) for u, v in pairs)


def test_batchnorm_step_probes_with_the_old_state_and_the_same_key(page):
    net, state = eqx.nn.make_with_state(page.Net)(jax.random.key(4))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    key, other_key = jax.random.key(5), jax.random.key(6)
    new_net, new_state, _, _ = page.net_step(
        net, state, page.tx.init(params), page.x, page.labels, key
    )

    def loss_and_state(p, k):
        return page.classify_loss(eqx.combine(p, static), state, page.x, page.labels, k)

    g = jax.grad(loss_and_state, has_aux=True)(params, key)[0]
    norm = np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree.leaves(g)))
    probe = jax.tree.map(lambda w, gi: w + RHO * gi / norm, params, g)

    def expected(k):  # one SGD step from a fresh momentum: w - lr * g(w + e), key k
        g_p = jax.grad(loss_and_state, has_aux=True)(probe, k)[0]
        return jax.tree.map(lambda w, gp: w - LR * gp, params, g_p)

    got = eqx.filter(new_net, eqx.is_inexact_array)
    assert largest_difference(got, expected(key)) < 1e-5
    # A probe with another dropout key would take another step: the check can fail.
    assert largest_difference(got, expected(other_key)) > 1e-3
    # The BatchNorm state kept is the clean pass's at w, not the probe's at w + e.
    clean, probed = loss_and_state(params, key)[1], loss_and_state(probe, key)[1]
    # (The running statistics move by 1 - momentum = 1 % of the batch statistics per
    # step, so the probe's would differ by about 4e-6 here; rounding differs by 1e-9.)
    assert largest_difference(new_state, clean) < 1e-7
    assert largest_difference(probed, clean) > 1e-6
