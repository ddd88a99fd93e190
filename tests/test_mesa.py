"""MESA (Du et al., NeurIPS 2022): trajectory loss, EMA and training against NumPy float64."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import compare, registry


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(student, teacher, tau):
    """tau^2 mean_i sum_c q_ic (log q_ic - log p_ic); q = softmax(t / tau), p = softmax(z / tau)."""
    log_q = np_log_softmax(np.asarray(teacher, np.float64) / tau)
    log_p = np_log_softmax(np.asarray(student, np.float64) / tau)
    return tau**2 * np.mean(np.sum(np.exp(log_q) * (log_q - log_p), -1))


def logits(seed, shape=(6, 5), scale=3.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_trajectory_kl_matches_numpy_value_and_gradient(tau):
    z, t = logits(0), logits(1)
    np.testing.assert_allclose(sam_optax.trajectory_kl(z, t, tau), np_kl(z, t, tau), rtol=1e-5)
    grad_z, grad_t = jax.grad(sam_optax.trajectory_kl, argnums=(0, 1))(z, t, tau)
    p = np.exp(np_log_softmax(np.asarray(z, np.float64) / tau))
    q = np.exp(np_log_softmax(np.asarray(t, np.float64) / tau))
    # d/dz_i = tau / B (softmax(z_i / tau) - softmax(t_i / tau)); the teacher gets nothing.
    np.testing.assert_allclose(grad_z, tau / z.shape[0] * (p - q), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(grad_t, np.zeros_like(grad_t))


@pytest.mark.parametrize("tau, expected", [(1.0, 0.25), (2.0, 0.267949)])
def test_trajectory_kl_gradient_facts(tau, expected):
    t = jnp.array([[np.log(3.0), 0.0]])
    grad = jax.grad(sam_optax.trajectory_kl)(jnp.zeros((1, 2)), t, tau)
    np.testing.assert_allclose(grad[0], [-expected, expected], rtol=1e-5)


def test_trajectory_kl_is_zero_at_the_teacher_and_float32_for_bf16():
    z = logits(2)
    assert float(sam_optax.trajectory_kl(z, z, 5.0)) == 0.0
    out = sam_optax.trajectory_kl(z.astype(jnp.bfloat16), logits(3).astype(jnp.bfloat16), 5.0)
    assert out.dtype == jnp.float32
    # Every leading axis is an example axis.
    z3, t3 = logits(4, (2, 3, 5)), logits(5, (2, 3, 5))
    np.testing.assert_allclose(
        sam_optax.trajectory_kl(z3, t3, 2.0),
        sam_optax.trajectory_kl(z3.reshape(6, 5), t3.reshape(6, 5), 2.0),
        rtol=1e-6,
    )


def make_params(dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(7))
    return {
        "kernel": jax.random.normal(k1, (4, 3), dtype),
        "bias": jax.random.normal(k2, (3,), dtype),
    }


def quad_loss(params):
    return sum(jnp.sum(jnp.cos(x) + 0.1 * x**2) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("front", [None, lambda: sam_optax.sam(0.05)], ids=["ema", "sam+ema"])
def test_ema_matches_numpy_over_several_steps_and_updates_pass_through(front):
    decay, steps = 0.7, 9
    members = ([] if front is None else [front()]) + [optax.sgd(0.1, momentum=0.9)]

    def trajectory(tx):
        params, state, path = make_params(), tx.init(make_params()), [make_params()]
        for _ in range(steps):
            g = jax.grad(quad_loss)(params)
            updates, state = tx.update(g, state, params, grad_fn=jax.grad(quad_loss))
            params = optax.apply_updates(params, updates)
            path.append(params)
        return path, state

    plain, _ = trajectory(optax.chain(*members))
    path, state = trajectory(optax.chain(*members, sam_optax.ema_params(decay)))
    chex.assert_trees_all_equal(path[-1], plain[-1])  # the updates are untouched
    v = jax.tree.map(lambda x: np.asarray(x, np.float64), plain[0])  # v_0 = w_0
    for w in plain[1:]:  # no bias correction
        v = jax.tree.map(lambda a, b: decay * a + (1 - decay) * np.asarray(b, np.float64), v, w)
    chex.assert_trees_all_close(sam_optax.ema_params_of(state), v, rtol=1e-6, atol=1e-6)
    assert int(state[-1].count) == steps


def test_ema_update_matches_numpy_and_keeps_dtypes():
    tree = {"mean": jnp.array([1.0, 2.0], jnp.bfloat16), "var": jnp.array([0.5])}
    new = {"mean": jnp.array([3.0, -2.0]), "var": jnp.array([2.5])}
    out = sam_optax.ema_update(tree, new, 0.75)
    assert out["mean"].dtype == jnp.bfloat16 and out["var"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["mean"], np.float64), [1.5, 1.0])
    np.testing.assert_allclose(out["var"], [0.75 * 0.5 + 0.25 * 2.5])


def test_ema_on_complex_params():
    params = {"w": jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64)}
    tx = optax.chain(optax.sgd(0.5), sam_optax.ema_params(0.5))
    state = tx.init(params)
    _, state = tx.update({"w": jnp.array([2.0 + 0j, 2.0j])}, state, params)
    w1 = np.array([1.0 + 2.0j, -0.5j]) - 0.5 * np.array([2.0, 2.0j])
    np.testing.assert_allclose(
        sam_optax.ema_params_of(state)["w"], 0.5 * np.array([1.0 + 2.0j, -0.5j]) + 0.5 * w1
    )


# One MESA run on a linear softmax classifier, against the gradient written out in NumPy:
# dL/dz_i = (softmax(z_i) - onehot(y_i)) / B
#           + lambda_t tau / B (softmax(z_i / tau) - softmax(t_i / tau)).
X = np.asarray(jax.random.normal(jax.random.key(11), (8, 4)), np.float64)
Y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
LR, MOMENTUM, WEIGHT, TAU, DECAY, START, END, STEPS = 0.5, 0.9, 0.8, 2.0, 0.6, 2, 6, 8


def numpy_mesa():
    w = jax.tree.map(lambda x: np.asarray(x, np.float64), make_params())
    v = jax.tree.map(np.copy, w)
    m = jax.tree.map(np.zeros_like, w)
    for t in range(STEPS):
        z = X @ w["kernel"] + w["bias"]
        teacher = X @ v["kernel"] + v["bias"]
        dz = np.exp(np_log_softmax(z)) - np.eye(3)[Y]
        if START <= t < END:
            p, q = np.exp(np_log_softmax(z / TAU)), np.exp(np_log_softmax(teacher / TAU))
            dz = dz + WEIGHT * TAU * (p - q)
        g = {"kernel": X.T @ dz / len(Y), "bias": dz.sum(0) / len(Y)}
        m = jax.tree.map(lambda a, b: MOMENTUM * a + b, m, g)
        w = jax.tree.map(lambda a, b: a - LR * b, w, m)
        v = jax.tree.map(lambda a, b: DECAY * a + (1 - DECAY) * b, v, w)
    return w, v


def mesa_run(weight=WEIGHT):
    apply = lambda p, x: x @ p["kernel"] + p["bias"]  # noqa: E731
    x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y)

    def loss(params, opt_state):
        z = apply(params, x)
        teacher = apply(sam_optax.ema_params_of(opt_state), x)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))
        return ce + sam_optax.mesa_loss(opt_state, z, teacher)

    tx = sam_optax.mesa(optax.sgd(LR, momentum=MOMENTUM), weight, TAU, DECAY, START, END)
    params = make_params()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params, state), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(STEPS):
        params, state = step(params, state)
    return params, state


def test_mesa_training_matches_numpy():
    params, state = mesa_run()
    w, v = numpy_mesa()
    chex.assert_trees_all_close(params, w, rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_close(sam_optax.ema_params_of(state), v, rtol=2e-5, atol=2e-6)
    mesa_state = next(s for s in state if isinstance(s, sam_optax.MesaState))
    assert int(mesa_state.count) == STEPS and float(mesa_state.weight) == 0.0  # past END


def test_mesa_weight_zero_is_the_base_optimizer():
    params, _ = mesa_run(weight=0.0)
    with_term, _ = mesa_run()
    base = optax.sgd(LR, momentum=MOMENTUM)
    p, s = make_params(), base.init(make_params())
    x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y)
    ce = lambda q: jnp.mean(  # noqa: E731
        optax.softmax_cross_entropy_with_integer_labels(x @ q["kernel"] + q["bias"], y)
    )
    for _ in range(STEPS):
        u, s = base.update(jax.grad(ce)(p), s, p)
        p = optax.apply_updates(p, u)
    chex.assert_trees_all_close(params, p, rtol=1e-6, atol=1e-7)
    assert not np.allclose(with_term["kernel"], p["kernel"], atol=1e-4)  # the term acts


def test_mesa_loss_window():
    tx = sam_optax.mesa(optax.sgd(0.1), weight=0.5, temperature=1.0, start_step=1, end_step=3)
    params = jnp.zeros(1)
    state = tx.init(params)
    z, t = jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])
    seen = []
    for _ in range(4):
        seen.append(float(sam_optax.mesa_loss(state, z, t)))
        _, state = tx.update(jnp.zeros(1), state, params)
    kl = np_kl(np.zeros((1, 2)), np.array([[1.0, 0.0]]), 1.0)
    np.testing.assert_allclose(seen, [0.0, 0.5 * kl, 0.5 * kl, 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: sam_optax.mesa(optax.sgd(0.1), weight=-0.1), "`weight`"),
        (lambda: sam_optax.mesa(optax.sgd(0.1), temperature=0.0), "`temperature`"),
        (lambda: sam_optax.mesa(optax.sgd(0.1), decay=1.5), "`decay`"),
        (lambda: sam_optax.mesa(optax.sgd(0.1), start_step=-1), "`start_step`"),
        (lambda: sam_optax.mesa(optax.sgd(0.1), end_step=2.5), "`end_step`"),
        (lambda: sam_optax.mesa("sgd"), "`base_optimizer`"),
        (lambda: sam_optax.ema_params(decay=-0.5), "`decay`"),
        (lambda: sam_optax.ema_params(accumulator_dtype=jnp.int32), "`accumulator_dtype`"),
        (lambda: sam_optax.ema_update({"a": jnp.ones(2)}, {"b": jnp.ones(2)}, 0.9), "`new`"),
        (lambda: sam_optax.ema_update({"a": jnp.ones(2, jnp.int32)}, {"a": 1}, 0.9), "dtype"),
        (lambda: sam_optax.trajectory_kl(jnp.ones((2, 3)), jnp.ones((2, 4))), "same shape"),
        (lambda: sam_optax.trajectory_kl(jnp.ones((2, 3)), jnp.ones((2, 3)), -1.0), "temperature"),
        (lambda: sam_optax.ema_params_of(optax.sgd(0.1).init(jnp.ones(1))), "EMAState"),
        (lambda: sam_optax.mesa_loss((), jnp.ones((1, 2)), jnp.ones((1, 2))), "MesaState"),
        (
            lambda: sam_optax.ema_params().init({"step": jnp.asarray(1, jnp.int32)}),
            "floating",
        ),
        (
            lambda: sam_optax.ema_params().update(
                jnp.ones(1), sam_optax.ema_params().init(jnp.ones(1))
            ),
            "`params`",
        ),
    ],
)
def test_bad_input_is_named(call, words):
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.slow
def test_compare_adds_the_loss_term_at_one_gradient_per_step():
    result = compare.run_compare("digits", "mesa", seeds=1, steps=30, progress=False)
    rows = {r["method"]: r for r in result.rows}
    # The KL term's gradient comes from the same backward pass as the cross-entropy's.
    assert rows["mesa"]["grads_per_step"] == 1.0
    assert rows["mesa"]["curves"] != rows["sgd"]["curves"] or (
        rows["mesa"]["train_loss"] != rows["sgd"]["train_loss"]
    )
    assert registry.METHODS["mesa"].loss_term is not None
