"""RWP against the documented equations (docs/methods/parallel.md), in NumPy float64."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax.pieces import Context


def draws(params, seed, count):
    """The documented standard normal draws: fold_in(key, count), one subkey per leaf."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), count), len(leaves))
    return treedef.unflatten(
        [
            np.asarray(jax.random.normal(k, jnp.shape(w)), np.float64)
            for w, k in zip(leaves, keys, strict=True)
        ]
    )


def perturb(params, sigma, count=0, seed=0):
    piece = sam_optax.filterwise_gaussian(seed=seed)
    ctx = Context(params, jnp.asarray(count), sigma, 1e-12, None, {})
    e, _ = piece.perturb(jax.tree.map(jnp.zeros_like, params), piece.init(params), ctx)
    return e


def test_kernel_noise_is_scaled_per_output_filter_and_vectors_by_their_norm():
    """Flax kernel [[3,0],[0,4]]: output filters are columns, norms 3 and 4; [3,4] gets 5σz."""
    params = {"kernel": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "bias": jnp.array([3.0, 4.0])}
    e = perturb(params, 0.1)
    z = draws(params, 0, 0)
    np.testing.assert_allclose(e["kernel"], 0.1 * np.array([3.0, 4.0]) * z["kernel"], rtol=1e-6)
    np.testing.assert_allclose(e["bias"], 5 * 0.1 * z["bias"], rtol=1e-6)


def test_a_zero_filter_gets_no_noise_and_a_zero_vector_almost_none():
    params = {"kernel": jnp.array([[1.0, 0.0], [2.0, 0.0]]), "bias": jnp.zeros(2)}
    e = perturb(params, 0.5)
    assert np.all(np.asarray(e["kernel"][:, 1]) == 0.0)
    assert np.all(np.asarray(e["kernel"][:, 0]) != 0.0)
    assert float(jnp.max(jnp.abs(e["bias"]))) < 1e-15  # σ (‖w‖ + 1e-16) z


def test_noise_is_a_fresh_draw_each_step_and_the_same_for_the_same_seed():
    params = {"kernel": jnp.ones((3, 2))}
    a, b, c = perturb(params, 0.1, 0), perturb(params, 0.1, 1), perturb(params, 0.1, 0)
    assert not np.allclose(a["kernel"], b["kernel"])
    chex.assert_trees_all_equal(a, c)
    assert not np.allclose(a["kernel"], perturb(params, 0.1, 0, seed=1)["kernel"])


def test_interpolate_mixes_the_two_gradients():
    piece = sam_optax.interpolate(0.5)
    out, _ = piece.combine(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), piece.init(None), None)
    np.testing.assert_allclose(out, [0.5, 0.5])
    out, _ = piece.fallback(jnp.array([2.0]), piece.init(None), None)
    np.testing.assert_allclose(out, [2.0])


RNG = np.random.default_rng(1)
A, B = RNG.normal(size=(8, 3)), RNG.normal(size=(8, 2))
W0 = {"kernel": RNG.normal(size=(3, 2)), "bias": RNG.normal(size=2)}


def loss(params):
    return 0.5 * jnp.mean((A @ params["kernel"] + params["bias"] - B) ** 2)


def np_grad(p):
    r = (A @ p["kernel"] + p["bias"] - B) / B.size
    return {"kernel": A.T @ r, "bias": r.sum(0)}


def np_rwp(sigma, lam, lr, momentum, steps=4):
    p = {k: v.copy() for k, v in W0.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for t in range(steps):
        z = draws(p, 0, t)
        n_k = np.linalg.norm(p["kernel"], axis=0, keepdims=True)  # per column (output filter)
        e = {"kernel": sigma * n_k * z["kernel"]}
        e["bias"] = sigma * (np.linalg.norm(p["bias"]) + 1e-16) * z["bias"]
        g, g_p = np_grad(p), np_grad({k: p[k] + e[k] for k in p})
        out = {k: (1 - lam) * g[k] + lam * g_p[k] for k in p}
        for k in p:
            buf[k] = out[k] + momentum * buf[k]
            p[k] = p[k] - lr * buf[k]
    return p


def run(tx, steps=4):
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), W0)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@pytest.mark.parametrize(("sigma", "lam"), [(0.01, 0.5), (0.3, 0.8)])
def test_several_steps_match_numpy(sigma, lam):
    tx = optax.chain(sam_optax.rwp(rho=sigma, lam=lam), optax.sgd(0.1, momentum=0.9))
    params, state = run(tx)
    want = np_rwp(sigma, lam, 0.1, 0.9)
    for k in want:
        np.testing.assert_allclose(params[k], want[k], rtol=2e-5, atol=1e-6)
    assert int(state[0].count) == 4 and int(state[0].probes) == 4


@pytest.mark.parametrize("kwargs", [{"rho": 0.0}, {"rho": 0.05, "lam": 0.0}])
def test_sigma_zero_or_lam_zero_is_the_base_optimizer_exactly(kwargs):
    ours, _ = run(optax.chain(sam_optax.rwp(**kwargs), optax.sgd(0.1, momentum=0.9)))
    theirs, _ = run(
        optax.chain(
            sam_optax.sharpness_aware(sam_optax.normalized_gradient(), rho=0.0),
            optax.sgd(0.1, momentum=0.9),
        )
    )
    chex.assert_trees_all_equal(ours, theirs)


def test_m_rwp_is_rwp_with_its_sigma():
    m, _ = run(optax.chain(sam_optax.rwp(rho=0.015, lam=0.5), optax.sgd(0.1)))
    want = np_rwp(0.015, 0.5, 0.1, 0.0)
    for k in want:
        np.testing.assert_allclose(m[k], want[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("make", "arg", "fragment"),
    [
        (lambda: sam_optax.rwp(rho=-0.01), "rho", "-0.01"),
        (lambda: sam_optax.rwp(lam=1.5), "lam", "1.5"),
        (lambda: sam_optax.rwp(lam="x"), "lam", "'x'"),
        (lambda: sam_optax.rwp(seed=0.5), "seed", "0.5"),
        (lambda: sam_optax.interpolate(-0.1), "lam", "-0.1"),
        (lambda: sam_optax.filterwise_gaussian(seed="a"), "seed", "'a'"),
    ],
)
def test_bad_arguments_name_the_argument(make, arg, fragment):
    with pytest.raises(ValueError, match=f"`{arg}`.*{fragment}"):
        make()
