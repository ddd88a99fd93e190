"""Mixed precision and loss scaling, as docs/guides/mixed_precision.md does them.

The page runs as written (its 300 steps in float32, bfloat16 and float16); its step is
then checked against a NumPy float64 SAM step, for unscaling both gradients alike, and
for skipping a step whose probe alone overflows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
import pytest
from docs_pages import DOCS, run_page

import sam_optax

PAGE = "guides/mixed_precision.md"
RHO, LR = 0.05, 0.1  # the page's tx: sam(rho=0.05) in front of sgd(0.1, momentum=0.9)
FLOAT32 = jmp.get_policy("float32")
BFLOAT16 = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
FLOAT16 = jmp.get_policy("params=float32,compute=float16,output=float32")


# SAM whose rho lives in the state: one compiled step probes far (rho = 1e4) or not at all.
FAR = optax.chain(optax.inject_hyperparams(sam_optax.sam)(rho=1e4), optax.sgd(LR, momentum=0.9))


@pytest.fixture(scope="module")
def page():
    with pytest.MonkeyPatch.context() as mp:
        yield run_page(DOCS / PAGE, mp)


@pytest.fixture(scope="module")
def one_step(page):
    """One step of the page's recipe from its params, compiled once per (policy, tx).

    Returns ``(params, new_state, loss_scale, loss, old_state)``.
    """
    make = functools.cache(page.make_train_step)

    def run(policy, scale, tx=page.tx, opt_state=None):
        opt_state = tx.init(page.params) if opt_state is None else opt_state
        loss_scale = jmp.DynamicLossScale(jnp.float32(scale))
        return (*make(policy, tx)(page.params, opt_state, loss_scale, page.x, page.y), opt_state)

    return run


def numpy_grad(p, x, y):
    """The gradient of mean((tanh(x w1 + b1) w2 + b2 - y)^2), in float64."""
    h = np.tanh(x @ p["w1"] + p["b1"])
    d_out = 2.0 * (h @ p["w2"] + p["b2"] - y[:, None]) / len(y)
    d_z = (d_out @ p["w2"].T) * (1.0 - h**2)
    return {
        "w1": x.T @ d_z,
        "b1": d_z.sum(0),
        "w2": h.T @ d_out,
        "b2": d_out.sum(0),
    }


def numpy_sam_step(p, x, y):
    """One SAM + SGD step from a fresh state: w - lr * g(w + rho g / ||g||), float64."""
    g = numpy_grad(p, x, y)
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    g_p = numpy_grad({k: p[k] + RHO * g[k] / norm for k in p}, x, y)
    return {k: p[k] - LR * g_p[k] for k in p}


def relative_error(got, want):
    num = sum(np.sum((np.asarray(got[k], np.float64) - want[k]) ** 2) for k in want)
    return float(np.sqrt(num / sum(np.sum(v**2) for v in want.values())))


def test_half_precision_runs_stay_within_the_stated_bounds(page):
    reference = page.runs["float32"][0]
    for name in ("bfloat16 compute", "float16 compute, loss scaling"):
        params, _ = page.runs[name]
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params)), name
        assert page.relative_distance(params, reference) < 0.03, name
        assert abs(page.float32_loss(params) - page.float32_loss(reference)) < 1e-3, name
    assert page.runs["float32"][1] == page.runs["bfloat16 compute"][1] == 0
    assert page.runs["float16 compute, loss scaling"][1] > 0  # the scale came down


@pytest.mark.parametrize(
    "policy,tolerance",
    [(FLOAT32, 1e-5), (BFLOAT16, 2e-2), (FLOAT16, 5e-3)],
    ids=["float32", "bfloat16", "float16"],
)
def test_one_scaled_step_is_numpy_float64_sam(page, one_step, policy, tolerance):
    want_params = numpy_sam_step(
        {k: np.asarray(v, np.float64) for k, v in page.params.items()},
        np.asarray(page.x, np.float64),
        np.asarray(page.y, np.float64),
    )
    params, _, loss_scale, _, _ = one_step(policy, 2**10)
    assert float(loss_scale.loss_scale) == 2**10  # a finite step keeps the scale
    want_update = {k: want_params[k] - np.asarray(page.params[k], np.float64) for k in want_params}
    got_update = {k: params[k] - page.params[k] for k in params}
    assert relative_error(got_update, want_update) < tolerance


def test_both_gradients_are_unscaled_alike(one_step):
    # In float32 a power-of-two scale is exact: the scaled step is the unscaled step.
    plain = one_step(FLOAT32, 1.0)[0]
    scaled = one_step(FLOAT32, 2**20)[0]
    for k in plain:
        np.testing.assert_allclose(scaled[k], plain[k], rtol=1e-6, atol=1e-9)


def test_an_overflowing_gradient_skips_the_step(page, one_step):
    # float16 holds at most 65504: a scale of 2**30 makes the scaled gradients infinite.
    params, opt_state, loss_scale, _, before = one_step(FLOAT16, 2**30)
    assert float(loss_scale.loss_scale) == 2**29
    assert jax.tree.all(jax.tree.map(jnp.array_equal, params, page.params))
    assert jax.tree.all(jax.tree.map(jnp.array_equal, opt_state, before))


def test_a_step_whose_probe_alone_overflows_is_skipped(page, one_step):
    # rho = 1e4 sends the probe to where the float16 loss overflows, while the loss and
    # the gradient at w are finite: the same step with rho = 0 (no probe) goes through.
    params, _, scale, loss, _ = one_step(FLOAT16, 2**10, FAR)
    assert np.isfinite(float(loss)) and float(scale.loss_scale) == 2**9
    assert jax.tree.all(jax.tree.map(jnp.array_equal, params, page.params))
    no_probe = optax.tree.set(FAR.init(page.params), rho=jnp.zeros(()))
    params, _, scale, _, _ = one_step(FLOAT16, 2**10, FAR, no_probe)
    assert float(scale.loss_scale) == 2**10
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, params, page.params))
