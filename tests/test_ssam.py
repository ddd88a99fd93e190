"""SSAM-F and SSAM-D against docs/methods/geometry.md in NumPy float64, and its facts."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax.pieces import Context

LR, RHO, B = 0.1, 0.2, 6
X = np.asarray(jax.random.normal(jax.random.key(1), (B, 4)), np.float64)
Y = np.asarray(jax.random.normal(jax.random.key(2), (B, 3)), np.float64)
BATCH = (jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32))


def make_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"bias": jax.random.normal(k1, (3,)), "kernel": jax.random.normal(k2, (4, 3))}


def per_example(p, batch):
    x, y = batch
    return 0.5 * jnp.sum(jnp.square(jnp.tanh(x @ p["kernel"] + p["bias"]) - y), axis=-1)


def loss(p):
    return jnp.mean(per_example(p, BATCH))


# ----- NumPy float64: leaves in sorted order, [bias (3,), kernel (4, 3)] -----


def np_example_grads(ws, n):
    """[bias, kernel] gradients of each of the first n examples' losses."""
    b, k = ws
    out = []
    for i in range(n):
        h = np.tanh(X[i] @ k + b)
        delta = (h - Y[i]) * (1 - h**2)
        out.append([delta, np.outer(X[i], delta)])
    return out


def np_grad(ws):
    per = np_example_grads(ws, B)
    return [sum(g[j] for g in per) / B for j in range(2)]


def flat(xs):
    return np.concatenate([x.ravel() for x in xs])


def unflat(v, like):
    out, start = [], 0
    for x in like:
        out.append(v[start : start + x.size].reshape(x.shape))
        start += x.size
    return out


def top(scores, k):
    """The k largest entries (ties to the earlier one) as a boolean vector."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    m = np.zeros(len(scores), bool)
    m[order[:k]] = True
    return m


def np_step(ws, m):
    g = np_grad(ws)
    scale = RHO / (np.linalg.norm(flat(g)) + 1e-12)
    e = unflat(scale * flat(g) * m, ws)
    g_p = np_grad([w + d for w, d in zip(ws, e, strict=True)])
    return [w - LR * x for w, x in zip(ws, g_p, strict=True)], g


def run(tx, steps, params=None):
    params = make_params() if params is None else params
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        updates, s = tx.update(
            jax.grad(loss)(p),
            s,
            p,
            grad_fn=jax.grad(loss),
            per_example_loss_fn=per_example,
            batch=BATCH,
        )
        return optax.apply_updates(p, updates), s

    out, masks = [], []
    for _ in range(steps):
        params, state = step(params, state)
        out.append([np.asarray(x, np.float64) for x in jax.tree.leaves(params)])
        sparse = getattr(state[0], "perturbation", None)
        if isinstance(sparse, sam_optax.SparseMaskState):
            masks.append(flat([np.asarray(m) for m in jax.tree.leaves(sparse.mask)]))
    return out, masks, state


def assert_close(ours, theirs):
    for a_step, b_step in zip(ours, theirs, strict=True):
        for a, b in zip(a_step, b_step, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_ssam_f_five_steps_match_numpy():
    sparsity, n, every = 0.5, 4, 2
    tx = optax.chain(
        sam_optax.ssam(rho=RHO, sparsity=sparsity, update_every=every, num_samples=n),
        optax.sgd(LR),
    )
    ours, masks, state = run(tx, 5)
    ws = [np.asarray(x, np.float64) for x in jax.tree.leaves(make_params())]
    size = 15
    theirs, want_masks = [], []
    for t in range(5):
        if t % every == 0:  # the mask is computed at the current w, used from this step
            fisher = sum(flat(g) ** 2 for g in np_example_grads(ws, n))
            m = top(fisher, size - math.ceil(sparsity * size))
        ws, _ = np_step(ws, m)
        theirs.append(ws)
        want_masks.append(m)
    assert_close(ours, theirs)
    for a, b in zip(masks, want_masks, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(state[0].perturbation.last) == 4


def test_ssam_d_five_steps_match_numpy():
    """Death by |g|, growth by |w| (deterministic scores), cosine drop rate over T = 8."""
    sparsity, drop, every, total = 0.4, 0.5, 2, 8
    tx = optax.chain(
        sam_optax.ssam(
            rho=RHO,
            sparsity=sparsity,
            update_every=every,
            mode="dynamic",
            drop_rate=drop,
            total_steps=total,
            growth="weight",
        ),
        optax.sgd(LR),
    )
    params = make_params()
    size, kept = 15, 15 - math.ceil(0.4 * 15)
    # The first mask, K random entries drawn on the first step: the same draw with no update.
    fixed = sam_optax.ssam(RHO, sparsity, None, mode="dynamic", total_steps=total)
    first = fixed.update(
        jax.grad(loss)(params), fixed.init(params), params, grad_fn=jax.grad(loss)
    )[1]
    m = flat([np.asarray(x) for x in jax.tree.leaves(first.perturbation.mask)])
    assert m.sum() == kept
    ours, masks, _ = run(tx, 5, params)
    ws = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    theirs, want_masks = [], []
    for t in range(5):
        w_old = flat(ws)
        ws, g = np_step(ws, m)  # e uses the old mask; the new one serves from the next step
        if t % every == 0:
            rate = drop * (1 + np.cos(np.pi * t / total)) / 2
            n = min(kept - math.floor(kept * (1 - rate)), size - kept)
            keep = top(np.where(m, np.abs(flat(g)), -np.inf), kept - n)
            grow = top(np.where(m, -np.inf, np.abs(w_old)), n)
            m = keep | grow
            assert m.sum() == kept
        theirs.append(ws)
        want_masks.append(m)
    assert_close(ours, theirs)
    for a, b in zip(masks, want_masks, strict=True):
        np.testing.assert_array_equal(a, b)


def test_full_gradient_norm_of_the_section():
    """g = (3, 4), M = (1, 0), rho = 1: e = (0.6, 0), not ESAM's masked-norm (1, 0)."""
    piece = sam_optax.sparse_mask_perturbation(update_every=None)
    state = piece.init(jnp.zeros(2))._replace(mask=jnp.array([True, False]))
    e, _ = piece.perturb(jnp.array([3.0, 4.0]), state, Context(None, 0, 1.0, 1e-12, None, {}))
    np.testing.assert_allclose(e, [0.6, 0.0], rtol=1e-6)


def _trajectory(method, steps=4):
    return run(optax.chain(method, optax.sgd(LR)), steps)[0]


@pytest.mark.parametrize("mode", ["fisher", "dynamic"])
def test_a_full_mask_is_sam_and_an_empty_one_the_base_optimizer(mode):
    kw = {"mode": mode, "update_every": 2, "total_steps": 10}
    sam = _trajectory(sam_optax.sam(rho=RHO))
    chex.assert_trees_all_equal(_trajectory(sam_optax.ssam(RHO, 0.0, **kw)), sam)
    plain = _trajectory(optax.identity())
    chex.assert_trees_all_close(
        _trajectory(sam_optax.ssam(RHO, 1.0, **kw)), plain, rtol=1e-6, atol=1e-7
    )


def test_fisher_mask_helper_and_set_sparse_mask():
    params = make_params()
    got = sam_optax.fisher_mask(per_example, params, BATCH, sparsity=0.6, num_samples=3)
    ws = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    fisher = sum(flat(g) ** 2 for g in np_example_grads(ws, 3))
    np.testing.assert_array_equal(
        flat([np.asarray(m) for m in jax.tree.leaves(got)]), top(fisher, 6)
    )
    # Installed by hand with update_every=None, the mask is never replaced.
    tx = optax.chain(sam_optax.ssam(RHO, 0.6, update_every=None), optax.sgd(LR))
    state = sam_optax.set_sparse_mask(tx.init(params), got)
    _, state = jax.jit(
        lambda s: tx.update(jax.grad(loss)(params), s, params, grad_fn=jax.grad(loss))
    )(state)
    chex.assert_trees_all_equal(state[0].perturbation.mask, got)
    with pytest.raises(ValueError, match="`mask` leaves must be boolean arrays"):
        sam_optax.set_sparse_mask(state, jax.tree.map(lambda m: m.astype(jnp.float32), got))
    with pytest.raises(ValueError, match="holds no SparseMaskState"):
        sam_optax.set_sparse_mask(optax.sgd(0.1).init(params), got)


def test_a_skipped_step_delays_the_mask_update_to_the_next_probe():
    tx = sam_optax.ssam(RHO, 0.5, update_every=1, policy=sam_optax.policies.every(2))
    params = make_params()
    state = tx.init(params)
    lasts = []
    for _ in range(4):
        _, state = tx.update(
            jax.grad(loss)(params),
            state,
            params,
            grad_fn=jax.grad(loss),
            per_example_loss_fn=per_example,
            batch=BATCH,
        )
        lasts.append(int(state.perturbation.last))
    assert lasts == [0, 0, 2, 2]


def test_kept_entries_is_exact():
    from sam_optax.sparse import kept_entries

    assert kept_entries(100, 0.43) == 57  # floor((1 - 0.43) * 100) would give 56
    assert kept_entries(10, 0.25) == 7 and kept_entries(10, 0.0) == 10 and kept_entries(5, 1) == 0


def test_fisher_mode_explains_missing_arguments():
    tx = sam_optax.ssam(update_every=5)
    params = make_params()
    with pytest.raises(ValueError, match="per_example_loss_fn = lambda p, batch"):
        tx.update(jax.grad(loss)(params), tx.init(params), params, grad_fn=jax.grad(loss))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.5}, r"`sparsity` must lie in \[0.0, 1.0\], got 1.5"),
        ({"update_every": 0}, r"`update_every` must be a positive integer, got 0"),
        ({"mode": "magic"}, r"`mode` must be one of \('fisher', 'dynamic'\), got 'magic'"),
        ({"num_samples": 0}, r"`num_samples` must be a positive integer, got 0"),
        ({"drop_rate": 2.0, "mode": "dynamic", "total_steps": 5}, r"`drop_rate` must lie in"),
        ({"mode": "dynamic"}, r"`total_steps` must be given for mode='dynamic'"),
        ({"death": "norm"}, r"`death` must be one of"),
        ({"growth": None}, r"`growth` must be one of"),
        ({"sparsity": jnp.asarray(0.5)}, r"`sparsity` must be a Python number"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.ssam(**kwargs)
