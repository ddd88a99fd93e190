"""bSAM against a NumPy float64 transcription of the update on docs/methods/bayesian.md.

The noise is drawn here with ``jax.random`` from the key the page documents (step ``t``,
group ``j``: ``split(fold_in(fold_in(PRNGKey(seed), t), j), leaves)``, one standard
normal draw per leaf), then every step is computed in float64 with NumPy.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import registry

A = {"bias": np.array([1.5, -0.5]), "kernel": np.array([[0.5, -1.0], [2.0, 0.3]])}
C = {"bias": np.array([4.0, 0.2]), "kernel": np.array([[1.0, 3.0], [0.5, 2.0]])}
KEYS = ("bias", "kernel")  # the leaf order of a dict


def loss_fn(params):
    """sum c (w - a)² + w⁴ / 4: curvature that differs between w, θ and w + e."""
    return sum(jnp.sum(C[k] * (params[k] - A[k]) ** 2 + params[k] ** 4 / 4) for k in KEYS)


def numpy_grad(w):
    return {k: 2 * C[k] * (w[k] - A[k]) + w[k] ** 3 for k in w}


def make_params():
    return {"bias": jnp.array([0.0, 1.0]), "kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]])}


def draw(seed, t, j, like):
    """The standard normal draw of step ``t``, group ``j``, as the docs page defines it."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), j)
    keys = jax.random.split(key, len(KEYS))
    return {
        k: np.asarray(jax.random.normal(keys[i], np.shape(like[k]), jnp.float32), np.float64)
        for i, k in enumerate(KEYS)
    }


def numpy_bsam(
    w, steps, *, lr, num_data, rho, b1, b2, delta, gamma, s0, seed=0, groups=1, grads=None
):
    """The update of docs/methods/bayesian.md; ``grads(j, p)`` is group j's gradient at p.

    Returns ``(w, m, s)`` after each step.
    """
    grads = grads or (lambda j, p: numpy_grad(p))
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    s = {k: np.full_like(v, s0) for k, v in w.items()}
    out = []
    for t in range(steps):
        g_p = {k: np.zeros_like(v) for k, v in w.items()}
        g_s = {k: np.zeros_like(v) for k, v in w.items()}
        for j in range(groups):
            z = draw(seed, t, j, w)
            theta = {k: w[k] + z[k] / np.sqrt(num_data * s[k]) for k in w}
            g = grads(j, theta)
            e = {k: rho(t) * g[k] / s[k] for k in w}
            gp = grads(j, {k: w[k] + e[k] for k in w})
            for k in w:
                g_p[k] += gp[k] / groups
                g_s[k] += np.sqrt(s[k]) * np.abs(g[k]) / groups
        m = {k: b1 * m[k] + (1 - b1) * (g_p[k] + delta * w[k]) for k in w}
        w_new = {k: w[k] - lr(t) * m[k] / s[k] for k in w}  # the old s
        s = {k: b2 * s[k] + (1 - b2) * (g_s[k] + gamma + delta) for k in w}
        w = w_new
        out.append((w, m, s))
    return out


def run(tx, params, steps, **extra):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss_fn)(p), s, p, grad_fn=jax.grad(loss_fn), **extra)
        return optax.apply_updates(p, u), s

    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append((params, state))
    return out


SETTINGS = {
    "official": dict(b1=0.9, b2=0.999, delta=2e-4, gamma=0.1, s0=1.0),
    # s moves fast and the prior is strong: every term of the update shows.
    "fast": dict(b1=0.5, b2=0.8, delta=0.05, gamma=0.02, s0=2.0),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_ten_noisy_steps_match_numpy(setting):
    h = SETTINGS[setting]
    lr = optax.cosine_decay_schedule(0.05, 12)
    rho = optax.linear_schedule(0.02, 0.1, 10)
    tx = sam_optax.bsam(
        lr,
        num_data=300,
        rho=rho,
        b1=h["b1"],
        b2=h["b2"],
        weight_decay=h["delta"],
        damping=h["gamma"],
        s_init=h["s0"],
        seed=3,
    )
    ours = run(tx, make_params(), 10)
    ref = numpy_bsam(
        make_params(), 10, lr=lambda t: float(lr(t)), rho=lambda t: float(rho(t)),
        num_data=300, seed=3, **h
    )  # fmt: skip
    for (p, state), (w, m, s) in zip(ours, ref, strict=True):
        chex.assert_trees_all_close(p, w, rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(state.momentum, m, rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(state.precision, s, rtol=2e-5, atol=2e-6)
    assert int(ours[-1][1].count) == 10
    # The noise matters: without it the trajectory is another one.
    quiet = numpy_bsam(
        make_params(), 10, lr=lambda t: float(lr(t)), rho=lambda t: float(rho(t)),
        num_data=np.inf, seed=3, **h
    )  # fmt: skip
    gap = max(float(np.max(np.abs(quiet[-1][0][k] - ref[-1][0][k]))) for k in KEYS)
    assert gap > 1e-3


def test_paper_numbers_on_half_w_squared():
    """f = w² / 2, no noise, w = 1, m = 0, s = 1, α 0.5, β1 0.9, β2 0.999, δ 0, γ 0.1."""
    grad = lambda w: w  # noqa: E731
    for rho, want_w, want_m in [(0.0, 0.95, 0.1), (0.01, 0.9495, 0.101)]:
        tx = sam_optax.bsam(0.5, float("inf"), rho=rho, weight_decay=0.0, damping=0.1)
        w = jnp.array([1.0])
        updates, state = tx.update(None, tx.init(w), w, grad_fn=grad)
        np.testing.assert_allclose(w + updates, [want_w], rtol=1e-6)
        np.testing.assert_allclose(state.momentum, [want_m], rtol=1e-6)
        # s uses the gradient at the (noise-free) sample, not at w + e: the same for both.
        np.testing.assert_allclose(state.precision, [1.0001], rtol=1e-7)


def test_b2_one_without_noise_or_prior_is_unnormalised_sam_with_ema_momentum():
    alpha, rho, b1 = 0.05, 0.1, 0.9
    tx = sam_optax.bsam(alpha, float("inf"), rho=rho, b1=b1, b2=1.0, weight_decay=0.0)
    ours = run(tx, make_params(), 8)
    w = {k: np.asarray(v, np.float64) for k, v in make_params().items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    for (p, state), _ in zip(ours, range(8), strict=True):
        g = numpy_grad(w)
        g_p = numpy_grad({k: w[k] + rho * g[k] for k in w})
        m = {k: b1 * m[k] + (1 - b1) * g_p[k] for k in w}
        w = {k: w[k] - alpha * m[k] for k in w}
        chex.assert_trees_all_close(p, w, rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(state.precision, jax.tree.map(jnp.ones_like, p))


def test_the_sample_is_the_documented_normal_draw():
    """(θ - w) sqrt(N s) is the standard normal draw of the step's key, in update and sampler."""
    params, num_data, s0 = make_params(), 50.0, 4.0
    tx = sam_optax.bsam(0.1, num_data, s_init=s0, seed=7)
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jax.grad(loss_fn)(p)

    state = tx.init(params)
    for t in range(2):
        seen.clear()
        s = state.precision  # the step samples with the precision from before it
        updates, state = tx.update(None, state, params, grad_fn=grad_fn)
        assert len(seen) == 2  # the sample, then the perturbed point: nothing else
        z = draw(7, t, 0, params)
        for k in KEYS:
            got = (np.asarray(seen[0][k]) - np.asarray(params[k])) * np.sqrt(num_data * s[k])
            np.testing.assert_allclose(got, z[k], rtol=1e-4, atol=1e-5)
        params = optax.apply_updates(params, updates)
    key = jax.random.key(11)
    fresh = optax.chain(optax.identity(), tx).init(params)  # s = s_init, at any depth
    theta = sam_optax.bsam_sample(params, fresh, key)
    keys = jax.random.split(key, 2)
    for i, k in enumerate(KEYS):
        want = jax.random.normal(keys[i], params[k].shape)
        got = (theta[k] - params[k]) * np.sqrt(num_data * s0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_updates_are_ignored():
    params = make_params()
    tx = sam_optax.bsam(0.1, 100.0)
    state = tx.init(params)
    a, _ = tx.update(jax.grad(loss_fn)(params), state, params, grad_fn=jax.grad(loss_fn))
    b, _ = tx.update(None, state, params, grad_fn=jax.grad(loss_fn))
    chex.assert_trees_all_equal(a, b)


# Groups: per-example losses of a linear model with a quartic term on the weights.
X = np.array([[0.5, -1.0], [1.0, 0.3], [-0.2, 0.8], [1.5, 0.1], [0.0, -0.7], [0.9, 0.9]])
Y = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 0.3], [-1.0, 1.0], [0.2, 0.2], [0.7, -0.4]])


def per_example(params, batch):
    x, y = batch
    pred = x @ params["kernel"] + params["bias"]
    reg = sum(jnp.sum(params[k] ** 4) / 4 for k in KEYS) / x.shape[0]
    return jnp.sum((pred - y) ** 2, axis=1) + reg


def group_grads(groups):
    size = len(X) // groups

    def grads(j, w):
        x, y = X[j * size : (j + 1) * size], Y[j * size : (j + 1) * size]
        r = x @ w["kernel"] + w["bias"] - y
        n = len(x)
        return {
            "bias": 2 * r.sum(0) / n + w["bias"] ** 3 / n,
            "kernel": 2 * x.T @ r / n + w["kernel"] ** 3 / n,
        }

    return grads


@pytest.mark.parametrize("groups", [2, 3])
def test_groups_match_numpy(groups):
    h = SETTINGS["fast"]
    tx = sam_optax.bsam(
        0.05, 200, rho=0.05, b1=h["b1"], b2=h["b2"], weight_decay=h["delta"],
        damping=h["gamma"], s_init=h["s0"], groups=groups, seed=1
    )  # fmt: skip
    batch = (jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32))
    params, state = make_params(), tx.init(make_params())
    step = jax.jit(lambda p, s: tx.update(None, s, p, per_example_loss_fn=per_example, batch=batch))
    ref = numpy_bsam(
        make_params(), 6, lr=lambda t: 0.05, rho=lambda t: 0.05, num_data=200, seed=1,
        groups=groups, grads=group_grads(groups), **h
    )  # fmt: skip
    for w, m, s in ref:
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(params, w, rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(state.momentum, m, rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(state.precision, s, rtol=2e-5, atol=2e-6)


def test_groups_need_the_batch_and_divide_it():
    tx = sam_optax.bsam(0.05, 200, groups=4)
    params = make_params()
    state = tx.init(params)
    batch = (jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32))
    with pytest.raises(ValueError, match="`per_example_loss_fn`"):
        tx.update(None, state, params, grad_fn=jax.grad(loss_fn), batch=batch)
    with pytest.raises(ValueError, match="`batch`"):
        tx.update(None, state, params, per_example_loss_fn=per_example)
    with pytest.raises(ValueError, match=r"`groups`=4 must divide the batch size 6"):
        tx.update(None, state, params, per_example_loss_fn=per_example, batch=batch)


def test_state_after_several_steps_survives_inject_hyperparams_and_sampling():
    tx = optax.inject_hyperparams(sam_optax.bsam, static_args=("groups",))(
        learning_rate=0.05, num_data=300, rho=0.02
    )
    ours = run(optax.chain(optax.identity(), tx), make_params(), 5)
    plain = run(sam_optax.bsam(0.05, 300, rho=0.02), make_params(), 5)
    chex.assert_trees_all_close(ours[-1][0], plain[-1][0], rtol=1e-6, atol=1e-7)
    key = jax.random.key(0)
    chex.assert_trees_all_close(
        sam_optax.bsam_sample(ours[-1][0], ours[-1][1], key),
        sam_optax.bsam_sample(plain[-1][0], plain[-1][1], key),
        rtol=1e-6,
        atol=1e-7,
    )


def test_bf16_params_keep_a_float32_state():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), make_params())
    tx = sam_optax.bsam(0.05, 300)
    updates, state = tx.update(None, tx.init(params), params, grad_fn=jax.grad(loss_fn))
    chex.assert_trees_all_equal_dtypes(updates, params)
    assert {x.dtype for x in jax.tree.leaves((state.momentum, state.precision))} == {
        jnp.dtype(jnp.float32)
    }


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"num_data": 0}, "num_data"),
        ({"num_data": float("nan")}, "num_data"),
        ({"rho": -0.01}, "rho"),
        ({"b1": 1.0}, "b1"),
        ({"b2": 1.5}, "b2"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"damping": -0.1}, "damping"),
        ({"s_init": 0.0}, "s_init"),
        ({"damping": 0.0, "weight_decay": 0.0}, "damping"),
        ({"groups": 0}, "groups"),
        ({"groups": 2.0}, "groups"),
        ({"seed": 0.5}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        sam_optax.bsam(**{"learning_rate": 0.1, "num_data": 100, **kwargs})


def test_bad_state_params_and_keys():
    params = make_params()
    with pytest.raises(ValueError, match="no BSAMState"):
        sam_optax.bsam_sample(params, optax.sgd(0.1).init(params), jax.random.key(0))
    state = sam_optax.bsam(0.1, 100).init(params)
    with pytest.raises(ValueError, match="`key`"):
        sam_optax.bsam_sample(params, state, 0)
    with pytest.raises(ValueError, match=r"\['step'\] has dtype int32"):
        sam_optax.bsam(0.1, 100).init({**params, "step": jnp.int32(0)})


def test_registry_builds_bsam_with_its_own_alpha_and_the_data_size():
    with pytest.raises(ValueError, match="num_data"):
        registry.make_optimizer("bsam", optax.sgd(0.1), total_steps=10)
    defaults = dict(registry.METHODS["bsam"].defaults)
    alpha = defaults.pop("alpha")
    tx = registry.make_optimizer(
        "bsam", optax.adam(1.0), learning_rate=0.3, total_steps=10, num_data=500
    )
    ours = run(tx, make_params(), 4)  # the base optimizer and its learning rate are unused
    want = run(
        sam_optax.bsam(optax.cosine_decay_schedule(alpha, 10), 500, **defaults), make_params(), 4
    )
    chex.assert_trees_all_equal(ours[-1][0], want[-1][0])
    assert registry.METHODS["bsam"].family == "bayesian"
