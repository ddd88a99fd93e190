"""The common matrix: every method against every contract of docs/design.md.

A new method joins by one entry in ``METHODS``: a function ``(rho, base, **kw) -> tx``
that returns the full optimizer (usually ``optax.chain(method(rho=rho, **kw), base)``);
``kw`` carries ``mask=`` and is forwarded to the method.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax


def _front(method, **kwargs):
    """A method that is chained in front of the base optimizer."""

    def make(rho, base, **extra):
        return optax.chain(method(rho=rho, **kwargs, **extra), base)

    return make


def _wsam_decoupled(rho, base, **extra):
    """Decoupled WSAM wraps the base optimizer; its sharpness term steps with lr 0.05."""
    return sam_optax.wsam_decoupled(base, 0.05, rho=rho, **extra)


METHODS = {
    "sam": _front(sam_optax.sam),
    "asam": _front(sam_optax.asam),
    "fisher_sam": _front(sam_optax.fisher_sam),
    # SWA behind: the updates pass through, so every contract applies to the chain.
    "wasam": lambda rho, base, **kw: sam_optax.wasam(base, rho=rho, start_step=1, every=2, **kw),
    "gsam": _front(sam_optax.gsam),
    "wsam": _front(sam_optax.wsam),
    "wsam_decoupled": _wsam_decoupled,
    "vasso": _front(sam_optax.vasso),
    "friendly_sam": _front(sam_optax.friendly_sam),
    "looksam": _front(sam_optax.looksam, k=3),
    "ae_sam": _front(sam_optax.ae_sam, total_steps=100),
    "ae_looksam": _front(sam_optax.ae_looksam, total_steps=100),
    "esam": _front(sam_optax.esam, gamma=1.0),
    "sam_every_k": _front(sam_optax.sam, policy=sam_optax.policies.every(3)),
    "rst": _front(sam_optax.sam, policy=sam_optax.policies.bernoulli(0.5)),
}

RHO = {"asam": 0.2}  # methods whose rho lives on another scale
RHO.update(wsam=0.005, wsam_decoupled=0.005)  # gamma = 0.9 multiplies the sharpness by 9


def _rho(name):
    return RHO.get(name, 0.05)


def make_params(dtype=jnp.float32):
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (3, 4), dtype),
            "bias": jax.random.normal(k2, (4,), dtype),
        },
        "scale": jnp.asarray(1.5, dtype),
        "vec": jax.random.normal(k3, (2,), dtype),
    }


def quadratic_loss(params):
    """A convex quadratic with distinct curvatures, minimum at 0.5 everywhere."""
    leaves = jax.tree.leaves(params)
    return sum(
        jnp.sum((i + 1.0) * jnp.square(x.astype(jnp.float32) - 0.5)) for i, x in enumerate(leaves)
    )


def mlp_data():
    x = jax.random.normal(jax.random.key(1), (64, 3))
    y = jnp.sin(x @ jnp.array([1.0, -2.0, 0.5]))[:, None] * jnp.ones((1, 4))
    return x, y


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    pred = params["scale"] * h + jnp.sum(params["vec"])
    return jnp.mean(jnp.square(pred - y))


def make_step(tx, loss_fn, **extra):
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, grad_fn=jax.grad(loss_fn), **extra)
        return optax.apply_updates(params, updates), state

    return step


def jit_probe_step(tx, loss_fn, grad_fn):
    """A jitted step that also returns the updates and the clean gradient, for inspection."""

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state, updates, grads

    return step


def run(tx, loss_fn, params, steps, jit=True):
    state = tx.init(params)
    step = make_step(tx, loss_fn)
    step = jax.jit(step) if jit else step
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


names = pytest.mark.parametrize("name", sorted(METHODS))


@names
def test_converges_on_quadratic(name):
    tx = METHODS[name](_rho(name), optax.sgd(0.05, momentum=0.5))
    params = make_params()
    start = quadratic_loss(params)
    params, _ = run(tx, quadratic_loss, params, 150)
    assert quadratic_loss(params) < 1e-3 * start
    chex.assert_trees_all_close(
        params, jax.tree.map(lambda x: jnp.full_like(x, 0.5), params), atol=0.05
    )


@names
def test_converges_on_mlp(name):
    x, y = mlp_data()
    loss_fn = functools.partial(mlp_loss, x=x, y=y)
    tx = METHODS[name](_rho(name), optax.adam(0.02))
    params = make_params()
    start = loss_fn(params)
    params, _ = run(tx, loss_fn, params, 200)
    assert loss_fn(params) < 0.25 * start


@names
@pytest.mark.parametrize(
    "base",
    [lambda: optax.sgd(0.05, momentum=0.9), lambda: optax.adamw(0.01, weight_decay=1e-2)],
    ids=["sgd_momentum", "adamw"],
)
def test_rho_zero_is_base_optimizer(name, base):
    x, y = mlp_data()
    loss_fn = functools.partial(mlp_loss, x=x, y=y)
    ours, _ = run(METHODS[name](0.0, base()), loss_fn, make_params(), 20)
    theirs = make_params()
    tx, state = base(), base().init(theirs)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss_fn)(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(20):
        theirs, state = step(theirs, state)
    chex.assert_trees_all_equal(ours, theirs)


@names
def test_scheduled_rho_at_zero_is_base_optimizer(name):
    """A schedule that is 0 takes the traced path and must still be exact."""
    x, y = mlp_data()
    loss_fn = functools.partial(mlp_loss, x=x, y=y)
    base = lambda: optax.sgd(0.05, momentum=0.9)  # noqa: E731
    ours, _ = run(METHODS[name](optax.constant_schedule(0.0), base()), loss_fn, make_params(), 5)
    theirs, _ = run(METHODS[name](0.0, base()), loss_fn, make_params(), 5)
    chex.assert_trees_all_equal(ours, theirs)


@names
def test_zero_gradient_gives_finite_updates(name):
    params = make_params()
    tx = METHODS[name](_rho(name), optax.sgd(0.1))
    zero_grad = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    updates, _ = jax.jit(lambda s: tx.update(zero_grad(params), s, params, grad_fn=zero_grad))(
        tx.init(params)
    )
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal(updates, zero_grad(params))


@names
def test_bf16_in_bf16_out(name):
    params = make_params(jnp.bfloat16)
    tx = METHODS[name](_rho(name), optax.identity())
    grad_fn = jax.grad(quadratic_loss)
    updates, state = jax.jit(lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn))(
        tx.init(params)
    )
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)
    # State dtypes do not drift: a second step sees the same structure and dtypes.
    _, state2 = jax.jit(lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn))(state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state2)


@names
def test_no_recompilation_after_first_step(name):
    traces = []
    tx = METHODS[name](_rho(name), optax.sgd(0.05, momentum=0.9))
    inner = make_step(tx, quadratic_loss)

    @jax.jit
    def step(params, state):
        traces.append(1)
        return inner(params, state)

    params = make_params()
    state = tx.init(params)
    for _ in range(4):
        params, state = step(params, state)
    assert len(traces) == 1


@names
def test_inject_hyperparams_gives_identical_updates(name):
    params = make_params()
    base = optax.sgd(0.05)
    plain = METHODS[name](_rho(name), base)
    # inject_hyperparams rebuilds the method each step with rho as a traced array.
    wrapped = optax.inject_hyperparams(lambda rho: METHODS[name](rho, base))(rho=_rho(name))
    p1, _ = run(plain, quadratic_loss, params, 3)
    p2, s2 = run(wrapped, quadratic_loss, params, 3)
    chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
    assert float(optax.tree.get(s2, "rho")) == pytest.approx(_rho(name))


@names
def test_chain_passes_other_extra_args(name):
    """A member that needs ``value=`` sits in the same chain."""
    params = make_params()
    tx = optax.chain(
        METHODS[name](_rho(name), optax.sgd(0.05)), optax.contrib.reduce_on_plateau(patience=2)
    )
    state = tx.init(params)
    step = jax.jit(
        lambda p, s: tx.update(
            jax.grad(quadratic_loss)(p),
            s,
            p,
            grad_fn=jax.grad(quadratic_loss),
            value=quadratic_loss(p),
        )
    )
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    chex.assert_tree_all_finite(params)


@names
def test_state_types_survive_scan(name):
    params = make_params()
    tx = METHODS[name](_rho(name), optax.sgd(0.05, momentum=0.9))
    step = make_step(tx, quadratic_loss)
    state0 = tx.init(params)
    (params_scan, state_scan), _ = jax.lax.scan(
        lambda carry, _: (step(*carry), None), (params, state0), None, length=5
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state_scan)
    params_loop, _ = run(tx, quadratic_loss, params, 5)
    chex.assert_trees_all_close(params_scan, params_loop, rtol=1e-5, atol=1e-6)


@names
def test_jit_and_eager_agree(name):
    tx = METHODS[name](_rho(name), optax.sgd(0.05, momentum=0.9))
    p_jit, _ = run(tx, quadratic_loss, make_params(), 3, jit=True)
    p_eager, _ = run(tx, quadratic_loss, make_params(), 3, jit=False)
    chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-6)


@names
def test_missing_grad_fn_or_params_is_explained(name):
    params = make_params()
    tx = METHODS[name](_rho(name), optax.sgd(0.05))
    state = tx.init(params)
    grads = jax.grad(quadratic_loss)(params)
    with pytest.raises(ValueError, match=r"grad_fn = lambda p: jax\.grad"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="`params`"):
        tx.update(grads, state, None, grad_fn=jax.grad(quadratic_loss))


@names
def test_grad_fn_with_wrong_structure_is_rejected(name):
    params = make_params()
    tx = METHODS[name](_rho(name), optax.sgd(0.05))
    state = tx.init(params)
    grads = jax.grad(quadratic_loss)(params)
    with pytest.raises(ValueError, match="structure"):
        tx.update(grads, state, params, grad_fn=lambda p: jax.tree.leaves(grads))


@names
def test_nan_in_masked_leaf_does_not_leak(name):
    """A leaf that is not perturbed may carry NaN; the others stay finite."""
    params = make_params()
    grad_fn = jax.grad(quadratic_loss)

    def nan_scale(p):
        g = grad_fn(p)
        g["scale"] = jnp.asarray(np.nan, jnp.float32)
        return g

    mask = jax.tree.map(lambda _: True, params)
    mask["scale"] = False
    tx = METHODS[name](_rho(name), optax.identity(), mask=mask)
    updates, _ = tx.update(nan_scale(params), tx.init(params), params, grad_fn=nan_scale)
    finite = {k: v for k, v in updates.items() if k != "scale"}
    chex.assert_tree_all_finite(finite)
