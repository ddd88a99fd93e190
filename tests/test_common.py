"""The common matrix: every method against every contract of docs/design.md.

A new method joins by one entry in ``METHODS``: a function ``(rho, base, **kw) -> tx``
that returns the full optimizer (usually ``optax.chain(method(rho=rho, **kw), base)``);
``kw`` carries ``mask=`` and is forwarded to the method.
"""

from __future__ import annotations

import functools
import itertools
import re

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


def _bsam(rho, base, **extra):
    """bSAM is a complete optimizer: ``base`` is unused. Small noise (N = 1e6), no prior."""
    del base
    return sam_optax.bsam(0.5, 1e6, rho=rho, weight_decay=0.0, **extra)


def _gam(rho, base, **extra):
    """GAM's skeleton radius is rho_prime (rho_prime = 0 is the base optimizer); rho is 0.2."""
    return optax.chain(sam_optax.gam(rho_prime=rho, **extra), base)


def _lookbehind(k):
    """Lookbehind-SAM wraps the base optimizer (adaptive alpha)."""
    return lambda rho, base, **extra: sam_optax.lookbehind_sam(base, rho=rho, k=k, **extra)


def _ssam_f(rho, base, **extra):
    """SSAM-F (mask recomputed every other step) with the per-example losses it needs.

    The matrix's problems have no examples: each of three stand-in examples has the
    loss ``b_n Σ |w|²`` over the float leaves, so the Fisher ranks the entries by
    ``|w|`` and the mask is a real, changing half of the params.
    """
    inner = optax.chain(sam_optax.ssam(rho=rho, sparsity=0.5, update_every=2, **extra), base)

    def per_example(p, batch):
        floating = [x for x in jax.tree.leaves(p) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return batch * sum(jnp.sum(jnp.square(jnp.abs(x)).astype(jnp.float32)) for x in floating)

    def update(updates, state, params=None, **kwargs):
        batch = jnp.arange(1.0, 4.0)
        return inner.update(
            updates, state, params, per_example_loss_fn=per_example, batch=batch, **kwargs
        )

    return optax.GradientTransformationExtraArgs(inner.init, update)


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
    "gcsam": _front(sam_optax.gcsam),
    "ssam_f": _ssam_f,
    "ssam_d": _front(sam_optax.ssam, sparsity=0.5, update_every=2, mode="dynamic", total_steps=100),
    "looksam": _front(sam_optax.looksam, k=3),
    "ae_sam": _front(sam_optax.ae_sam, total_steps=100),
    "ae_looksam": _front(sam_optax.ae_looksam, total_steps=100),
    "esam": _front(sam_optax.esam, gamma=1.0),
    "sam_every_k": _front(sam_optax.sam, policy=sam_optax.policies.every(3)),
    "rst": _front(sam_optax.sam, policy=sam_optax.policies.bernoulli(0.5)),
    # MESA's optimizer side behind SAM: its EMA passes the updates through (its KL term
    # is part of the caller's loss, which these contracts do not involve).
    "mesa": lambda rho, base, **kw: sam_optax.mesa(optax.chain(sam_optax.sam(rho, **kw), base)),
    # SAMPa wraps the base optimizer; same_batch, so that grad_fn (one batch) serves both
    # of its gradients (the lagged form needs a pair oracle: tests/test_sampa.py).
    "sampa": lambda rho, base, **kw: sam_optax.sampa(base, rho=rho, same_batch=True, **kw),
    "rwp": _front(sam_optax.rwp),
    "bsam": _bsam,
    "gam": _gam,
    "lookbehind_sam": _lookbehind(2),
    "lookbehind_sam_k1": _lookbehind(1),
}

# Methods for which rho = 0 is not the base optimizer, and why (their own tests say what is).
RHO_ZERO_NOT_BASE = {
    "sampa": "with lam > 0 part of its step is the gradient at the trial point y",
    "bsam": "its own optimizer: rho = 0 is a noisy Adam-like method, not the base",
    "lookbehind_sam": "k > 1 takes k base steps along g and looks back; the k = 1 row is exact",
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


def names_except(**reasons):
    """``names`` without the methods to which a contract cannot apply (``name="why"``)."""
    return pytest.mark.parametrize("name", sorted(set(METHODS) - set(reasons)))


# GCSAM descends along centralised gradients: each kernel column keeps its mean (the
# hyperplane of gradient centralisation), so its minimum is there, not at 0.5.
CENTRALIZED = {"gcsam"}


@names
def test_converges_on_quadratic(name):
    tx = METHODS[name](_rho(name), optax.sgd(0.05, momentum=0.5))
    params = make_params()
    target = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    if name in CENTRALIZED:
        kernel = params["dense"]["kernel"]
        target["dense"]["kernel"] = jnp.broadcast_to(kernel.mean(axis=0), kernel.shape)
    start = quadratic_loss(params) - quadratic_loss(target)
    params, _ = run(tx, quadratic_loss, params, 150)
    assert quadratic_loss(params) - quadratic_loss(target) < 1e-3 * start
    chex.assert_trees_all_close(params, target, atol=0.05)


@names
def test_converges_on_mlp(name):
    x, y = mlp_data()
    loss_fn = functools.partial(mlp_loss, x=x, y=y)
    tx = METHODS[name](_rho(name), optax.adam(0.02))
    params = make_params()
    start = loss_fn(params)
    params, _ = run(tx, loss_fn, params, 200)
    assert loss_fn(params) < 0.25 * start


@names_except(**RHO_ZERO_NOT_BASE)
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


@names_except(bsam="no mask: every leaf has its posterior (optax.partition with full_params)")
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


# ----- Reliability under real use: integer, complex and huge leaves, dtypes, part of
# the model. Every method of METHODS joins each test. -----

# SWA and MESA's EMA average every leaf, bSAM keeps a posterior of every leaf: they
# refuse integer leaves at init.
REJECTS_INTEGER_LEAVES = {"wasam", "mesa", "bsam"}


def _float_loss(params):
    """The quadratic over the float leaves; an integer leaf ``step`` does not enter."""
    return quadratic_loss({k: v for k, v in params.items() if k != "step"})


@names
def test_integer_leaf_is_never_perturbed_and_passes_through(name):
    params = {**make_params(), "step": jnp.asarray(7, jnp.int32)}
    tx = METHODS[name](_rho(name), optax.identity())
    if name in REJECTS_INTEGER_LEAVES:
        with pytest.raises(ValueError, match=r"\['step'\] has dtype int32"):
            tx.init(params)
        return
    seen = []

    def grad_fn(p):
        jax.debug.callback(lambda s: seen.append(int(s)), p["step"])
        return jax.grad(_float_loss, allow_int=True)(p)

    grads = jax.grad(_float_loss, allow_int=True)(params)
    out, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    assert out["step"].dtype == jax.dtypes.float0
    jax.effects_barrier()
    assert set(seen) <= {7}  # the integer leaf is never perturbed
    # The float leaves get what they get when the leaf is a float that the mask excludes.
    ref_params = {**make_params(), "step": jnp.asarray(7.0, jnp.float32)}
    mask = {**jax.tree.map(lambda _: True, make_params()), "step": False}
    ref = METHODS[name](_rho(name), optax.identity(), mask=mask)
    want, _ = ref.update(
        jax.grad(_float_loss)(ref_params),
        ref.init(ref_params),
        ref_params,
        grad_fn=jax.grad(_float_loss),
    )
    del out["step"], want["step"]
    chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-7)


def test_esam_selection_with_an_integer_leaf():
    """ESAM's data selection takes its own gradient: it allows integer leaves too."""

    def per_example(p, b):
        return (b["x"] @ p["w"] - b["y"]) ** 2

    batch = {"x": jax.random.normal(jax.random.key(0), (8, 3)), "y": jnp.ones(8)}
    tx = sam_optax.esam(rho=0.05, beta=1.0, gamma=0.5)
    outs = []
    for params in ({"w": jnp.full(3, 0.1)}, {"w": jnp.full(3, 0.1), "step": jnp.int32(3)}):
        grads = jax.grad(lambda p: jnp.mean(per_example(p, batch)), allow_int=True)(params)
        out, _ = tx.update(
            grads, tx.init(params), params, per_example_loss_fn=per_example, batch=batch
        )
        outs.append(out)
    assert outs[1]["step"].dtype == jax.dtypes.float0
    chex.assert_trees_all_close(outs[1]["w"], outs[0]["w"], rtol=1e-6)


@names
def test_float64_probe_gradient_is_cast_before_any_cond(name):
    with jax.enable_x64(True):
        params = make_params()  # float32
        tx = METHODS[name](_rho(name), optax.sgd(0.05))
        grad64 = lambda p: jax.tree.map(  # noqa: E731
            lambda x: x.astype(jnp.float64), jax.grad(quadratic_loss)(p)
        )
        outs = [
            jax.jit(
                lambda s, f=f: tx.update(jax.grad(quadratic_loss)(params), s, params, grad_fn=f)
            )(tx.init(params))[0]
            for f in (grad64, jax.grad(quadratic_loss))
        ]
    chex.assert_trees_all_equal_dtypes(outs[0], params)
    chex.assert_trees_all_close(outs[0], outs[1], rtol=1e-6, atol=1e-7)


@names_except(bsam="its e = rho g / s is not normalised (official code): 1e30 g overflows")
def test_huge_finite_gradients_give_finite_updates_and_states(name):
    """loss = 0.5e30 Σ (p - 0.1)²: gradients near 1e30, inner products near 1e60."""

    def loss(p):
        return 0.5e30 * sum(jnp.sum(jnp.square(x - 0.1)) for x in jax.tree.leaves(p))

    tx = METHODS[name](_rho(name), optax.sgd(1e-31))
    if name == "wsam_decoupled":  # its sharpness term steps with its own learning rate
        tx = sam_optax.wsam_decoupled(optax.sgd(1e-31), 1e-31, rho=_rho(name))
    step = jax.jit(make_step(tx, loss))
    params, state = make_params(), tx.init(make_params())
    for _ in range(4):  # LookSAM (k = 3) probes, reuses g_v twice, probes again
        params, state = step(params, state)
        chex.assert_tree_all_finite((params, state))
    assert not jnp.allclose(params["vec"], make_params()["vec"])


# One step on complex parameters against NumPy complex128. The loss Σ c |w - a|² has
# JAX's gradient 2 c conj(w - a) (the conjugate of the steepest ascent); grad_fn is
# that formula, so every method sees the same oracle as the reference.
COMPLEX_C = {"kernel": np.array([[1.0, 2.0], [0.5, 1.5]]), "bias": np.array([3.0, 0.25])}
COMPLEX_A = {
    "kernel": np.array([[1 + 1j, -0.5 + 2j], [0.3 - 0.7j, 2j]]),
    "bias": np.array([1.0, -1j]),
}
COMPLEX_W = {
    "kernel": np.array([[0.5 - 1j, 2 + 0.5j], [-1 + 0j, 0.2j]]),
    "bias": np.array([0.3j, 1.0]),
}


def complex_grad(p, xp=np):
    return {k: 2.0 * COMPLEX_C[k] * xp.conj(p[k] - COMPLEX_A[k]) for k in ("kernel", "bias")}


def _np_norm(tree):
    return np.sqrt(sum(np.sum(np.abs(x) ** 2) for x in tree.values()))


def _np_re_dot(a, b):
    return sum(np.sum((np.conj(a[k]) * b[k]).real) for k in a)


def _np_probe(e):
    return complex_grad({k: COMPLEX_W[k] + e[k] for k in e})


def _np_sam(g, rho):
    n = _np_norm(g)
    return _np_probe({k: rho * x / (n + 1e-12) for k, x in g.items()})


def _np_asam(g, rho, eta=0.01):
    t = {"kernel": np.abs(COMPLEX_W["kernel"]) + eta, "bias": np.ones(2)}
    n = _np_norm({k: t[k] * g[k] for k in g})
    return _np_probe({k: rho * t[k] ** 2 * g[k] / (n + 1e-12) for k in g})


def _np_fisher(g, rho, eta=1.0):
    f = {k: 1.0 + eta * np.abs(x) ** 2 for k, x in g.items()}
    denom = np.sqrt(sum(np.sum(np.abs(g[k]) ** 2 / f[k]) for k in g) + 1e-12)
    return _np_probe({k: rho * (g[k] / f[k]) / denom for k in g})


def _np_gsam(g, rho, alpha=0.4):
    g_p = _np_sam(g, rho)
    coef = _np_re_dot(g, g_p) / (_np_norm(g_p) ** 2 + 1e-12)
    return {k: g_p[k] - alpha * (g[k] - coef * g_p[k]) for k in g}


def _np_wsam(g, rho, scale=1.0, alpha=9.0):
    g_p = _np_sam(g, rho)
    return {k: g[k] + scale * alpha * (g_p[k] - g[k]) for k in g}


def _np_esam(g, rho, beta=0.6):
    """Every mask ESAM may draw (one bit per leaf); the step used one of them."""
    out = []
    for bits in ((0, 0), (0, 1), (1, 0), (1, 1)):
        m = {k: b * g[k] for k, b in zip(("bias", "kernel"), bits, strict=True)}
        n = _np_norm(m)
        out.append(_np_probe({k: rho / beta * x / (n + 1e-12) for k, x in m.items()}))
    return out


def _np_rwp(g, rho, lam=0.5):
    """The documented draws (fold_in(key 0, step 0), one subkey per leaf), per filter."""
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), 0), 2)
    z = {
        k: np.asarray(jax.random.normal(keys[i], COMPLEX_W[k].shape, jnp.complex64))
        for i, k in enumerate(("bias", "kernel"))  # the leaves in tree order
    }
    scale = {
        "kernel": np.linalg.norm(np.abs(COMPLEX_W["kernel"]), axis=0, keepdims=True),
        "bias": np.linalg.norm(np.abs(COMPLEX_W["bias"])) + 1e-16,
    }
    g_p = _np_probe({k: rho * scale[k] * z[k] for k in g})
    return {k: (1 - lam) * g[k] + lam * g_p[k] for k in g}


def _np_bsam(g, rho):
    """bSAM's first step (s = 1, m = 0, N = 1e6, alpha 0.5, b1 0.9, no prior), its own noise.

    The complex draw of step 0, group 0 (docs/methods/bayesian.md), one key per leaf.
    """
    del g  # bSAM takes its gradients at the sample and at the perturbed point
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0), 0)
    keys = dict(zip(("bias", "kernel"), jax.random.split(key, 2), strict=True))
    z = {
        k: np.asarray(jax.random.normal(keys[k], w.shape, jnp.complex64))
        for k, w in COMPLEX_W.items()
    }
    g_n = complex_grad({k: COMPLEX_W[k] + z[k] / np.sqrt(1e6) for k in z})
    return {k: -0.5 * 0.1 * x for k, x in _np_probe({k: rho * x for k, x in g_n.items()}).items()}


def _np_add(*trees):
    return {k: sum(t[k] for t in trees) for k in trees[0]}


def _np_unit(tree, radius):
    n = _np_norm(tree)
    return {k: radius * x / (n + 1e-12) for k, x in tree.items()}


def _np_gam(g, rho, rho_norm=0.2, alpha=0.1, beta=0.1, gamma=0.05):
    g_1 = _np_sam(g, rho)
    e_2 = _np_unit({k: g_1[k] - g[k] for k in g}, rho_norm)
    g_2 = _np_probe(e_2)
    g_3 = _np_probe(_np_add(e_2, _np_unit(g_2, rho)))
    h_plus = {k: alpha * g_1[k] + (1 - alpha) * g_3[k] for k in g}
    h_low = {k: g[k] + abs(1 - beta) * g_2[k] for k in g}
    coef = _np_re_dot(h_low, h_plus) / (_np_norm(h_plus) ** 2 + 1e-12)
    return {k: h_plus[k] - gamma * (h_low[k] - coef * h_plus[k]) for k in g}


def _np_lookbehind(g, rho, k=2):
    """With the identity base, the fast weights move by + each probe gradient."""
    e, moved, first = {key: 0.0 for key in g}, {key: 0.0 for key in g}, None
    for _ in range(k):
        e = _np_add(e, _np_unit(g, rho))
        g = _np_probe(e)
        moved = _np_add(moved, g)
        first = moved if first is None else first
    cos = {
        key: _np_re_dot({key: first[key]}, {key: moved[key]})
        / (_np_norm({key: first[key]}) * _np_norm({key: moved[key]}))
        for key in g
    }
    return {key: (1 + cos[key]) / 2 * moved[key] for key in g}


def _np_gc(tree):
    """Gradient centralisation of the leaf named kernel, over its input axis."""
    return {k: v - v.mean(axis=0, keepdims=True) if k == "kernel" else v for k, v in tree.items()}


def _np_gcsam(g, rho):
    c = _np_gc(g)
    n = _np_norm(c)
    return _np_gc(_np_probe({k: rho * x / (n + 1e-12) for k, x in c.items()}))


def _np_sparse(g, rho, mask):
    """SAM's e on the entries of ``mask`` (flat, leaves in order bias, kernel)."""
    n = _np_norm(g)
    flat = np.concatenate([g["bias"].ravel(), g["kernel"].ravel()]) * rho / (n + 1e-12) * mask
    return _np_probe({"bias": flat[:2], "kernel": flat[2:].reshape(2, 2)})


def _np_ssam_f(g, rho):
    """The stand-in per-example losses b_n Σ |w|² rank the entries by |w|: keep 3 of 6."""
    w = np.concatenate([COMPLEX_W["bias"].ravel(), COMPLEX_W["kernel"].ravel()])
    mask = np.zeros(6)
    mask[np.argsort(-np.abs(w), kind="stable")[:3]] = 1.0
    return _np_sparse(g, rho, mask)


def _np_ssam_d(g, rho):
    """Every first mask SSAM-D may draw (3 random entries of 6); the step used one of them."""
    return [
        _np_sparse(g, rho, np.isin(np.arange(6), kept).astype(float))
        for kept in itertools.combinations(range(6), 3)
    ]


COMPLEX_REFERENCES = {
    "sam": _np_sam,
    "asam": _np_asam,
    "fisher_sam": _np_fisher,
    "wasam": _np_sam,  # SWA passes the updates through
    "gsam": _np_gsam,
    "wsam": _np_wsam,
    "wsam_decoupled": lambda g, rho: _np_wsam(g, rho, scale=-0.05),  # base(g) - lr α (g_p - g)
    "vasso": _np_sam,  # the first step of VaSSO and F-SAM is SAM's
    "friendly_sam": _np_sam,
    "gcsam": _np_gcsam,
    "ssam_f": _np_ssam_f,
    "ssam_d": _np_ssam_d,
    "looksam": _np_sam,  # step 0 probes
    "ae_sam": _np_sam,
    "ae_looksam": _np_sam,
    "esam": _np_esam,
    "sam_every_k": _np_sam,
    "rst": lambda g, rho: [g, _np_sam(g, rho)],  # a coin decides whether step 0 probes
    "mesa": _np_sam,  # the EMA passes SAM's updates through
    "sampa": lambda g, rho: g,  # step 0: G = 0, so x̃ = y = w
    "rwp": _np_rwp,
    "bsam": _np_bsam,  # the update itself, not a direction for the (unused) base
    "gam": _np_gam,
    "lookbehind_sam": _np_lookbehind,
    "lookbehind_sam_k1": _np_sam,  # identity base: one probe gradient, alpha = 1
}


@names
def test_complex_parameters_match_numpy(name):
    params = {k: jnp.asarray(v, jnp.complex64) for k, v in COMPLEX_W.items()}
    grad_fn = functools.partial(complex_grad, xp=jnp)
    tx = METHODS[name](_rho(name), optax.identity())
    out, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
    g = complex_grad(COMPLEX_W)
    if name == "wsam_decoupled":  # identity base: base(g) = g, then g - lr α (g_p - g)
        g_p = _np_sam(g, _rho(name))
        wants = [{k: g[k] - 0.05 * 9.0 * (g_p[k] - g[k]) for k in g}]
    else:
        want = COMPLEX_REFERENCES[name](g, _rho(name))
        wants = want if isinstance(want, list) else [want]
    errors = [max(float(np.max(np.abs(np.asarray(out[k]) - w[k]))) for k in w) for w in wants]
    assert min(errors) < 2e-5 * _np_norm(g), errors


def test_msam_and_swa_on_complex_parameters():
    """The registry's complete optimizers: MSAM's first step and SWA's average."""
    params = {k: jnp.asarray(v, jnp.complex64) for k, v in COMPLEX_W.items()}
    g = complex_grad(COMPLEX_W)
    tx = sam_optax.msam(0.1, momentum=0.9, rho=0.3)
    out, _ = tx.update(complex_grad(params, xp=jnp), tx.init(params), params)
    scale = 0.3 / (_np_norm(g) + 1e-12)  # v = g, s_0 = 0, s_1 = rho / ‖v‖
    for k in g:
        np.testing.assert_allclose(np.asarray(out[k]), -0.1 * g[k] - scale * g[k], rtol=1e-5)
    tx = optax.chain(optax.sgd(0.1), sam_optax.swa())
    state = tx.init(params)
    _, state = tx.update(complex_grad(params, xp=jnp), state, params)
    for k in g:
        np.testing.assert_allclose(
            np.asarray(sam_optax.swa_params(state)[k]), COMPLEX_W[k] - 0.1 * g[k], rtol=1e-5
        )


@names
def test_inside_partition_with_full_params_others_descend_along_their_clean_gradient(name):
    """The method on the `dense` group equals the method on that sub-model alone."""
    params, labels = make_params(), {"dense": "sam", "scale": "plain", "vec": "plain"}
    labels["dense"] = {"kernel": "sam", "bias": "sam"}
    tx = optax.partition(
        {"sam": METHODS[name](_rho(name), optax.sgd(0.05)), "plain": optax.sgd(0.05)}, labels
    )
    grads = jax.grad(quadratic_loss)(params)
    with pytest.raises(ValueError, match="full_params"):
        tx.update(grads, tx.init(params), params, grad_fn=jax.grad(quadratic_loss))
    out, _ = tx.update(
        grads, tx.init(params), params, grad_fn=jax.grad(quadratic_loss), full_params=params
    )
    sub = METHODS[name](_rho(name), optax.sgd(0.05))

    def sub_grad(dense):
        return jax.grad(quadratic_loss)({**params, "dense": dense})["dense"]

    want, _ = sub.update(
        grads["dense"], sub.init(params["dense"]), params["dense"], grad_fn=sub_grad
    )
    chex.assert_trees_all_close(out["dense"], want, rtol=1e-6, atol=1e-7)
    for k in ("scale", "vec"):
        chex.assert_trees_all_close(out[k], -0.05 * grads[k], rtol=1e-6)


def test_sharded_sam_norms_need_one_all_reduce_per_sum():
    """FSDP-sharded params under an Explicit mesh: Blue's three sums, not one per leaf."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    local = {
        f"layer{i}": {"kernel": jnp.arange(64.0).reshape(16, 4) / (i + 1), "bias": jnp.ones(8)}
        for i in range(6)
    }
    spec = lambda x: jax.sharding.PartitionSpec("data" if x.shape[0] == 16 else None)  # noqa: E731
    tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
    step = jax.jit(make_step(tx, quadratic_loss))
    want, _ = step(local, tx.init(local))
    with jax.set_mesh(mesh):
        params = jax.tree.map(
            lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))), local
        )
        compiled = step.lower(params, tx.init(params)).compile()
        got, _ = compiled(params, tx.init(params))
        text = compiled.as_text()
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)  # summation order differs
    reduces = [line for line in text.splitlines() if re.search(r" all-reduce(-start)?\(", line)]
    operands = sum(
        re.search(r"all-reduce(?:-start)?\((.*?)\)", line).group(1).count("%") for line in reduces
    )
    assert operands == 3, reduces


@names_except(bsam="no base optimizer to clip in: clip the gradients grad_fn returns")
def test_clipping_after_the_method_bounds_what_reaches_the_base_optimizer(name):
    """docs/guides/compositions.md: clip after the method (inside the base optimizer).

    Decoupled WSAM's sharpness term bypasses the base optimizer by design: the page's
    recipe clips both gradients, which bounds it by lr α ‖g_p - g‖ <= 0.05 · 9 · 2.
    """

    def loss(p):
        return 1e4 * sum(jnp.sum(jnp.square(x - 3.0)) for x in jax.tree.leaves(p))

    clip = optax.clip_by_global_norm(1.0)
    tx = METHODS[name](_rho(name), optax.chain(clip, optax.sgd(1.0)))
    grad_fn, bound = jax.grad(loss), 1.0
    if name == "lookbehind_sam":  # k = 2 clipped base steps, then alpha <= 1 per leaf
        bound = 2.0
    if name == "wsam_decoupled":
        grad_fn = lambda p: clip.update(jax.grad(loss)(p), clip.init(p))[0]  # noqa: E731
        bound += 0.05 * 9.0 * 2.0
    params = make_params()
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
        assert float(optax.tree.norm(updates)) <= bound * (1 + 1e-5)
