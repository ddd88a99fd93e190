"""SAM, ASAM and Fisher SAM: one step against docs/methods/core.md in NumPy float64.

The loss is separable, ``L(w) = sum(a w^2 / 2 + b w^4 / 4 + c w)`` per leaf, so its
gradient ``a w + b w^3 + c`` is computed in NumPy independently of JAX.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

SHAPES = {"conv": {"kernel": (2, 3, 4), "bias": (4,)}, "dense": {"kernel": (4, 3)}, "scale": ()}
MASK = {"conv": {"kernel": True, "bias": False}, "dense": {"kernel": True}, "scale": False}


def _coefficients():
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda s: isinstance(s, tuple))
    coef = [
        (rng.uniform(0.5, 2.0, size=s), rng.uniform(0.5, 2.0, size=s), rng.normal(size=s))
        for s in leaves
    ]
    w = [rng.normal(size=s) for s in leaves]
    return treedef, coef, w


TREEDEF, COEF, W64 = _coefficients()


def np_grad(w_leaves):
    return [a * w + b * w**3 + c for w, (a, b, c) in zip(w_leaves, COEF, strict=True)]


def jax_loss(params):
    leaves = TREEDEF.flatten_up_to(params)
    return sum(
        jnp.sum(a * w**2 / 2 + b * w**4 / 4 + c * w)
        for w, (a, b, c) in zip(leaves, COEF, strict=True)
    )


def params32():
    return TREEDEF.unflatten([jnp.asarray(w, jnp.float32) for w in W64])


def np_norm(leaves):
    return np.sqrt(sum(np.sum(x**2) for x in leaves))


def flags(mask):
    return [True] * len(W64) if mask is None else TREEDEF.flatten_up_to(mask)


def np_sam(w, rho, eps, mask):
    g = [x if keep else np.zeros_like(x) for x, keep in zip(np_grad(w), flags(mask), strict=True)]
    n = np_norm(g)
    return np_grad([wi + rho * gi / (n + eps) for wi, gi in zip(w, g, strict=True)])


def np_asam(w, rho, eta, eps, mask):
    g = [x if keep else np.zeros_like(x) for x, keep in zip(np_grad(w), flags(mask), strict=True)]
    names = [p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(params32())[0]]
    t = [
        np.ones_like(wi) if n == "bias" else np.abs(wi) + eta
        for wi, n in zip(w, names, strict=True)
    ]
    n = np_norm([ti * gi for ti, gi in zip(t, g, strict=True)])
    return np_grad([wi + rho * ti**2 * gi / (n + eps) for wi, ti, gi in zip(w, t, g, strict=True)])


def np_fisher(w, rho, eta, eps, mask):
    g = [x if keep else np.zeros_like(x) for x, keep in zip(np_grad(w), flags(mask), strict=True)]
    f = [1.0 + eta * gi**2 for gi in g]
    denom = np.sqrt(sum(np.sum(gi**2 / fi) for gi, fi in zip(g, f, strict=True)) + eps)
    return np_grad([wi + rho * (gi / fi) / denom for wi, gi, fi in zip(w, g, f, strict=True)])


CASES = {
    "sam": (lambda mask: sam_optax.sam(rho=0.3, mask=mask), lambda w, m: np_sam(w, 0.3, 1e-12, m)),
    "asam": (
        lambda mask: sam_optax.asam(rho=0.7, eta=0.05, mask=mask),
        lambda w, m: np_asam(w, 0.7, 0.05, 1e-12, m),
    ),
    "fisher_sam": (
        lambda mask: sam_optax.fisher_sam(rho=0.4, eta=0.8, mask=mask),
        lambda w, m: np_fisher(w, 0.4, 0.8, 1e-12, m),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mask", [None, MASK], ids=["all_leaves", "masked"])
def test_one_step_matches_numpy_float64(name, mask):
    make, reference = CASES[name]
    tx = make(mask)
    params = params32()
    grads = jax.grad(jax_loss)(params)
    out, state = jax.jit(lambda s: tx.update(grads, s, params, grad_fn=jax.grad(jax_loss)))(
        tx.init(params)
    )
    expected = TREEDEF.unflatten(reference(W64, mask))
    chex.assert_trees_all_close(out, expected, rtol=2e-5, atol=2e-5)
    assert int(state.count) == 1 and int(state.probes) == 1


def test_mask_as_a_function_of_params_equals_the_pytree_mask():
    params = params32()
    grads = jax.grad(jax_loss)(params)

    def no_bias_no_scalars(p):
        paths, treedef = jax.tree_util.tree_flatten_with_path(p)
        return treedef.unflatten([x.ndim > 0 and path[-1].key != "bias" for path, x in paths])

    a = sam_optax.sam(rho=0.3, mask=MASK)
    b = sam_optax.sam(rho=0.3, mask=no_bias_no_scalars)
    ua, _ = a.update(grads, a.init(params), params, grad_fn=jax.grad(jax_loss))
    ub, _ = b.update(grads, b.init(params), params, grad_fn=jax.grad(jax_loss))
    chex.assert_trees_all_equal(ua, ub)


def test_asam_with_eta_zero_never_perturbs_a_zero_weight():
    params = {"kernel": jnp.array([0.0, 1.0])}
    seen = []

    def grad_fn(p):
        seen.append(p["kernel"])
        return {"kernel": jnp.ones(2)}

    tx = sam_optax.asam(rho=1.0, eta=0.0)
    tx.update({"kernel": jnp.ones(2)}, tx.init(params), params, grad_fn=grad_fn)
    assert float(seen[0][0]) == 0.0 and float(seen[0][1]) == pytest.approx(2.0)


def test_fisher_with_eta_zero_is_sam_up_to_eps_placement():
    params = params32()
    grads = jax.grad(jax_loss)(params)
    fisher = sam_optax.fisher_sam(rho=0.2, eta=0.0, eps=0.0)
    plain = sam_optax.sam(rho=0.2, eps=0.0)
    uf, _ = fisher.update(grads, fisher.init(params), params, grad_fn=jax.grad(jax_loss))
    us, _ = plain.update(grads, plain.init(params), params, grad_fn=jax.grad(jax_loss))
    chex.assert_trees_all_close(uf, us, rtol=1e-5)


def test_rho_schedule_is_evaluated_at_the_step_count():
    """rho = 0 at step 0 (plain gradient) and 0.3 from step 1 (SAM)."""
    params = params32()
    grads = jax.grad(jax_loss)(params)

    def schedule(count):
        return jnp.where(count < 1, 0.0, 0.3)

    tx = sam_optax.sam(rho=schedule)
    state = tx.init(params)
    out0, state = tx.update(grads, state, params, grad_fn=jax.grad(jax_loss))
    out1, state = tx.update(grads, state, params, grad_fn=jax.grad(jax_loss))
    chex.assert_trees_all_equal(out0, grads)
    chex.assert_trees_all_close(out1, TREEDEF.unflatten(np_sam(W64, 0.3, 1e-12, None)), rtol=2e-5)
    assert int(state.probes) == 1 and int(state.count) == 2


def test_matches_optax_contrib_sam_opaque_mode_step_for_step():
    """The only other JAX implementation is the outside reference (it has no eps)."""
    rho, lr = 0.1, 0.05
    ours = optax.chain(sam_optax.sam(rho=rho, eps=0.0), optax.sgd(lr))
    theirs = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        opaque_mode=True,
    )
    p_ours = p_theirs = params32()
    s_ours, s_theirs = ours.init(p_ours), theirs.init(p_theirs)

    @jax.jit
    def step_ours(p, s):
        u, s = ours.update(jax.grad(jax_loss)(p), s, p, grad_fn=jax.grad(jax_loss))
        return optax.apply_updates(p, u), s

    @jax.jit
    def step_theirs(p, s):
        grad_fn = lambda q, _: jax.grad(jax_loss)(q)  # noqa: E731
        u, s = theirs.update(jax.grad(jax_loss)(p), s, p, grad_fn=grad_fn)
        return optax.apply_updates(p, u), s

    for _ in range(10):
        p_ours, s_ours = step_ours(p_ours, s_ours)
        p_theirs, s_theirs = step_theirs(p_theirs, s_theirs)
        chex.assert_trees_all_close(p_ours, p_theirs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(p_ours)[0], W64[0])  # the gradients were non-zero


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sam_optax.sam(rho=-0.1), r"`rho` must lie in \[0.0, inf\], got -0.1"),
        (lambda: sam_optax.asam(rho=-1.0), "`rho`"),
        (lambda: sam_optax.asam(eta=-0.01), "`eta`"),
        (lambda: sam_optax.fisher_sam(eta=-1.0), "`eta`"),
        (lambda: sam_optax.fisher_sam(rho=float("nan")), "`rho`"),
        (lambda: sam_optax.sam(rho="0.05"), "`rho` must be a number or an optax schedule"),
        (lambda: sam_optax.sam(eps=-1.0), "`eps`"),
        (lambda: sam_optax.sam(mask=True), "`mask` must be None"),
        (lambda: sam_optax.sam(axis_name=3), "`axis_name`"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("method", [sam_optax.sam, sam_optax.asam, sam_optax.fisher_sam])
def test_mask_with_wrong_structure_is_rejected(method):
    params = params32()
    tx = method(mask={"conv": True})
    with pytest.raises(ValueError, match="`mask` must have the structure of the params"):
        tx.update(params, tx.init(params), params, grad_fn=jax.grad(jax_loss))
    tx = method(mask=jax.tree.map(lambda _: 1.0, params))
    with pytest.raises(ValueError, match="`mask` leaves must be Python booleans"):
        tx.update(params, tx.init(params), params, grad_fn=jax.grad(jax_loss))


def test_grad_fn_returning_wrong_shapes_is_rejected():
    params = params32()
    tx = sam_optax.sam()
    with pytest.raises(ValueError, match="shape"):
        tx.update(
            params,
            tx.init(params),
            params,
            grad_fn=lambda p: jax.tree.map(lambda x: jnp.zeros((7,)), p),
        )


def test_huge_gradients_give_a_perturbation_of_norm_rho():
    """‖g‖² overflows float32 at 1e30; the norm must not."""
    params = {"w": jnp.zeros(3)}
    seen = []

    def grad_fn(p):
        seen.append(p["w"])
        return {"w": jnp.ones(3)}

    tx = sam_optax.sam(rho=0.5)
    g = {"w": jnp.array([1e30, -1e30, 2e30], jnp.float32)}
    tx.update(g, tx.init(params), params, grad_fn=grad_fn)
    assert float(jnp.linalg.norm(seen[0])) == pytest.approx(0.5, rel=1e-5)


# ASAM's rule for T on a Flax- and Haiku-named tree: True where T = |w| + eta, written
# out leaf by leaf from the official code's "weight" parameters (docs/methods/core.md).
NAMED = {
    "Dense_0": {"kernel": ((3, 2), True), "bias": ((2,), False)},
    "BatchNorm_0": {"scale": ((2,), True), "bias": ((2,), False)},
    "linear": {"w": ((2, 2), True), "b": ((2,), False)},
    "layer_norm": {"scale": ((2,), True), "offset": ((2,), False)},
    "pos_embed": ((3, 2), True),
    "temperature": ((), False),
}
NAMED_LEAVES, NAMED_DEF = jax.tree.flatten(NAMED, is_leaf=lambda x: isinstance(x, tuple))
NAMED_W = [np.random.default_rng(1).normal(size=shape) for shape, _ in NAMED_LEAVES]
NAMED_C = [np.random.default_rng(2).normal(size=shape) for shape, _ in NAMED_LEAVES]


def named_grad(w):
    """The gradient of Σ (w⁴/4 + c w) per leaf."""
    return [wi**3 + ci for wi, ci in zip(w, NAMED_C, strict=True)]


def named_jax_grad(params):
    return jax.grad(
        lambda p: sum(
            jnp.sum(w**4 / 4 + c * w)
            for w, c in zip(NAMED_DEF.flatten_up_to(p), NAMED_C, strict=True)
        )
    )(params)


def named_step(tx):
    params = NAMED_DEF.unflatten([jnp.asarray(w, jnp.float32) for w in NAMED_W])
    out, _ = tx.update(named_jax_grad(params), tx.init(params), params, grad_fn=named_jax_grad)
    return [np.asarray(x, np.float64) for x in NAMED_DEF.flatten_up_to(out)]


def np_asam_probe(rho, eta, adaptive, eps=1e-12):
    g = named_grad(NAMED_W)
    t = [np.abs(w) + eta if a else np.ones_like(w) for w, a in zip(NAMED_W, adaptive, strict=True)]
    n = np_norm([ti * gi for ti, gi in zip(t, g, strict=True)])
    return named_grad(
        [w + rho * ti**2 * gi / (n + eps) for w, ti, gi in zip(NAMED_W, t, g, strict=True)]
    )


def test_asam_default_rule_scales_weight_tensors_only():
    rule = [adaptive for _, adaptive in NAMED_LEAVES]
    assert jax.tree.leaves(sam_optax.adaptive_leaves(NAMED_DEF.unflatten(NAMED_W))) == rule
    got = named_step(sam_optax.asam(rho=0.5, eta=0.01))
    for a, b in zip(got, np_asam_probe(0.5, 0.01, rule), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    custom = NAMED_DEF.unflatten([not adaptive for adaptive in rule])  # any pytree of booleans
    got = named_step(sam_optax.asam(rho=0.5, eta=0.01, adaptive_mask=custom))
    for a, b in zip(got, np_asam_probe(0.5, 0.01, [not x for x in rule]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def np_davda54_adaptive_probe(rho):
    """davda54/sam's first_step with adaptive=True, then the gradient at the new weights.

    grad_norm = ‖ stack(‖|p| ⊙ p.grad‖ over parameters) ‖, scale = rho / (grad_norm + 1e-12),
    e_w = p² ⊙ p.grad ⊙ scale on every parameter, biases included.
    """
    g = named_grad(NAMED_W)
    grad_norm = np.linalg.norm(
        [np.linalg.norm(np.abs(w) * gi) for w, gi in zip(NAMED_W, g, strict=True)]
    )
    scale = rho / (grad_norm + 1e-12)
    return named_grad([w + w**2 * gi * scale for w, gi in zip(NAMED_W, g, strict=True)])


def test_asam_all_leaves_eta_zero_is_davda54_adaptive():
    """docs/guides/from_pytorch.md: SAM(adaptive=True, rho=2.0) is this exactly."""
    got = named_step(sam_optax.asam(rho=2.0, eta=0.0, adaptive_mask=True))
    for a, b in zip(got, np_davda54_adaptive_probe(2.0), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    default = named_step(sam_optax.asam(rho=2.0, eta=0.0))  # biases get T = 1: not the same
    assert not all(
        np.allclose(a, b, rtol=1e-3)
        for a, b in zip(default, np_davda54_adaptive_probe(2.0), strict=True)
    )
