"""ESAM: the stochastic mask and the sub-batch selection against NumPy float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax

RHO, EPS = 0.05, 1e-12


def test_swp_mask_is_a_per_leaf_bernoulli_draw():
    """With ``grad_fn(p) = p - w`` the output is ``e`` itself, so the mask can be read off."""
    beta, leaves, steps = 0.6, 10, 200
    params = {f"l{j}": jnp.full((3,), 0.1 * j) for j in range(leaves)}
    tx = sam_optax.esam(RHO, beta=beta, gamma=1.0, seed=7)
    grad_fn = lambda p: jax.tree.map(lambda a, b: a - b, p, params)  # noqa: E731
    step = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=grad_fn))
    rng = np.random.default_rng(0)
    state, masks = tx.init(params), []
    for _ in range(steps):
        g = {k: rng.normal(size=3).astype(np.float32) for k in params}
        e, state = step(g, state)
        e = {k: np.asarray(v, np.float64) for k, v in e.items()}
        kept = {k: bool(np.any(v != 0)) for k, v in e.items()}
        for k in params:  # a whole leaf is kept or dropped
            assert np.all(e[k] != 0) == kept[k]
        masked = {k: g[k].astype(np.float64) * kept[k] for k in params}
        norm = np.sqrt(sum(np.sum(v**2) for v in masked.values()))
        for k in params:
            want = RHO / beta * masked[k] / (norm + EPS)
            np.testing.assert_allclose(e[k], want, rtol=1e-4, atol=1e-6)
        masks.append([kept[k] for k in params])
    masks = np.array(masks)
    assert abs(masks.mean() - beta) < 0.05  # 2000 draws: about 4.5 standard deviations
    assert len({tuple(m) for m in masks}) > 50  # redrawn every step
    assert int(state.probes) == steps


def test_beta_one_is_sam():
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    loss = lambda p: jnp.sum(p["w"] ** 4)  # noqa: E731
    g = jax.grad(loss)(params)
    ours, _ = sam_optax.esam(RHO, beta=1.0, gamma=1.0).update(
        g, sam_optax.esam(RHO, 1.0, 1.0).init(params), params, grad_fn=jax.grad(loss)
    )
    theirs, _ = sam_optax.sam(RHO).update(
        g, sam_optax.sam(RHO).init(params), params, grad_fn=jax.grad(loss)
    )
    np.testing.assert_array_equal(ours["w"], theirs["w"])


def regression(batch_size=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch_size, 3)) * rng.uniform(0.2, 2.0, size=(batch_size, 1))
    y = rng.normal(size=batch_size)
    return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def np_losses(w, b, batch):
    return (batch["x"].astype(np.float64) @ w + b - batch["y"]) ** 2


def np_grad(w, b, batch, index):
    x, y = batch["x"][index].astype(np.float64), batch["y"][index].astype(np.float64)
    r = x @ w + b - y
    return 2 * (r[:, None] * x).mean(0), 2 * r.mean()


@pytest.mark.parametrize("gamma, k", [(0.5, 5), (0.3, 3), (0.01, 1)])
@pytest.mark.parametrize("give_losses", [False, True], ids=["recompute", "losses"])
def test_sds_takes_the_probe_on_the_k_sharpest_examples(gamma, k, give_losses):
    batch = regression()
    params = {"w": jnp.array([0.3, -0.2, 0.8]), "b": jnp.asarray(0.1)}
    seen = []

    def per_example(p, data):
        seen.append(data["x"].shape[0])  # at trace time: the batch size of each call
        return (data["x"] @ p["w"] + p["b"] - data["y"]) ** 2

    w, b = np.asarray(params["w"], np.float64), 0.1
    full = np.arange(10)
    g_w, g_b = np_grad(w, b, batch, full)
    scale = RHO / (np.sqrt(np.sum(g_w**2) + g_b**2) + EPS)
    w_p, b_p = w + scale * g_w, b + scale * g_b
    rise = np_losses(w_p, b_p, batch) - np_losses(w, b, batch)
    chosen = np.argsort(-rise)[:k]
    want_w, want_b = np_grad(w_p, b_p, batch, chosen)

    tx = sam_optax.esam(RHO, beta=1.0, gamma=gamma)
    extra = {"losses": per_example(params, batch)} if give_losses else {}
    seen.clear()
    grads = {"w": jnp.asarray(g_w, jnp.float32), "b": jnp.asarray(g_b, jnp.float32)}
    out, state = jax.jit(
        lambda g: tx.update(
            g, tx.init(params), params, per_example_loss_fn=per_example, batch=batch, **extra
        )
    )(grads)
    np.testing.assert_allclose(np.asarray(out["w"]), want_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(out["b"]), want_b, rtol=1e-4, atol=1e-5)
    if k > 1:  # the official code's strict `>` keeps K - 1 examples: not this
        official_w, _ = np_grad(w_p, b_p, batch, np.argsort(-rise)[: k - 1])
        assert np.abs(np.asarray(out["w"]) - official_w).max() > 1e-3
    # Full-batch forwards (two, or one with `losses`), and the backward on K rows only.
    assert sorted(seen) == sorted([10] * (1 if give_losses else 2) + [k])
    assert int(state.probes) == 1


def test_sds_missing_arguments_are_named():
    params = {"w": jnp.ones(3), "b": jnp.asarray(0.0)}
    batch = regression()
    tx = sam_optax.esam(RHO, beta=1.0, gamma=0.5)
    g = jax.tree.map(jnp.ones_like, params)
    per_example = lambda p, d: (d["x"] @ p["w"] + p["b"] - d["y"]) ** 2  # noqa: E731
    with pytest.raises(ValueError, match="`per_example_loss_fn`"):
        tx.update(g, tx.init(params), params, batch=batch)
    with pytest.raises(ValueError, match="`batch`"):
        tx.update(g, tx.init(params), params, per_example_loss_fn=per_example)
    with pytest.raises(ValueError, match=r"`losses`.*shape \(10,\)"):
        tx.update(
            g,
            tx.init(params),
            params,
            per_example_loss_fn=per_example,
            batch=batch,
            losses=jnp.ones(3),
        )
    off = sam_optax.esam(RHO, beta=1.0, gamma=1.0)
    with pytest.raises(ValueError, match="grad_fn"):
        off.update(g, off.init(params), params, per_example_loss_fn=per_example, batch=batch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 0.0}, "`beta`"),
        ({"beta": 1.5}, "`beta`"),
        ({"gamma": 0.0}, "`gamma`"),
        ({"gamma": 1.5}, "`gamma`"),
        ({"gamma": lambda t: 0.5}, "`gamma`"),
        ({"rho": -0.1}, "`rho`"),
        ({"seed": 1.5}, "`seed`"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.esam(**kwargs)


def test_skipped_step_runs_no_selection(calls):
    """Under ``every(2)`` a skipped step evaluates no per-example loss at all."""
    batch = regression()
    params = {"w": jnp.array([0.3, -0.2, 0.8]), "b": jnp.asarray(0.1)}
    per_example = calls.wrap(lambda p, d: (d["x"] @ p["w"] + p["b"] - d["y"]) ** 2)
    tx = sam_optax.esam(RHO, beta=0.6, gamma=0.5, policy=sam_optax.policies.every(2))
    grads = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(
        lambda s, losses: tx.update(
            grads, s, params, per_example_loss_fn=per_example, batch=batch, losses=losses
        )
    )
    state, executed = tx.init(params), []
    losses = jnp.ones(10)
    for _ in range(4):
        out, state = step(state, losses)
        executed.append(calls.take())
    assert executed == [2, 0, 2, 0]  # probe: the forward at w + e and the sub-batch pass
    np.testing.assert_array_equal(np.asarray(out["w"]), np.ones(3))


def test_swp_mask_is_the_same_on_every_device():
    """Different gradients per device, one replicated key: the same leaves are perturbed."""
    mesh = jax.make_mesh((8,), ("d",))
    params = {f"l{j}": jnp.zeros(2) for j in range(6)}
    tx = sam_optax.esam(RHO, beta=0.5, gamma=1.0)
    grad_fn = lambda p: p  # noqa: E731  (params are zero: the output is e)

    def local(g, state):
        g = jax.tree.map(lambda x: x[0], g)
        e, state = tx.update(g, state, params, grad_fn=grad_fn)
        return jax.tree.map(lambda x: x[None], e), state

    step = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P("d"), P()), out_specs=(P("d"), P()), check_vma=False
        )
    )
    rng = np.random.default_rng(1)
    state, patterns = tx.init(params), set()
    for _ in range(5):
        g = {k: rng.normal(size=(8, 2)).astype(np.float32) + 3.0 for k in params}
        g = jax.device_put(g, NamedSharding(mesh, P("d")))
        e, state = step(g, state)
        kept = np.stack([np.any(np.asarray(e[k]) != 0, axis=1) for k in params], axis=1)
        assert (kept == kept[:1]).all(), kept  # one pattern across the 8 devices
        patterns.add(tuple(kept[0]))
    assert len(patterns) > 1


def _sds_update(tx, params, batch, per_example):
    grads = jax.grad(lambda p: jnp.mean(per_example(p, batch)))(params)
    return tx.update(grads, tx.init(params), params, per_example_loss_fn=per_example, batch=batch)[
        0
    ]


def _per_example(p, d):
    return (d["x"] @ p["w"] + p["b"] - d["y"]) ** 2


@pytest.mark.parametrize("groups, gamma, k", [(2, 0.4, 2), (5, 0.5, 1), (10, 1e-3, 1)])
def test_groups_select_the_k_sharpest_of_each_slice(groups, gamma, k):
    """``groups`` contiguous slices of the batch each keep their own top ``K / groups``."""
    batch = regression()
    params = {"w": jnp.array([0.3, -0.2, 0.8]), "b": jnp.asarray(0.1)}
    w, b = np.asarray(params["w"], np.float64), 0.1
    g_w, g_b = np_grad(w, b, batch, np.arange(10))
    scale = RHO / (np.sqrt(np.sum(g_w**2) + g_b**2) + EPS)
    w_p, b_p = w + scale * g_w, b + scale * g_b
    rise = np_losses(w_p, b_p, batch) - np_losses(w, b, batch)
    size = 10 // groups
    chosen = np.concatenate(
        [j * size + np.argsort(-rise[j * size : (j + 1) * size])[:k] for j in range(groups)]
    )
    want_w, want_b = np_grad(w_p, b_p, batch, chosen)
    tx = sam_optax.esam(RHO, beta=1.0, gamma=gamma, groups=groups)
    out = jax.jit(lambda p: _sds_update(tx, p, batch, _per_example))(params)
    np.testing.assert_allclose(np.asarray(out["w"]), want_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(out["b"]), want_b, rtol=1e-4, atol=1e-5)
    if groups == 5:  # example 1 (the first pair's sharpest) replaces 3: not the global top 5
        global_w, _ = np_grad(w_p, b_p, batch, np.argsort(-rise)[: k * groups])
        assert np.abs(np.asarray(out["w"]) - global_w).max() > 1e-3


def test_groups_must_divide_the_batch():
    params = {"w": jnp.ones(3), "b": jnp.asarray(0.0)}
    with pytest.raises(ValueError, match="`groups`=3 must divide the batch size 10"):
        _sds_update(sam_optax.esam(gamma=0.5, groups=3), params, regression(), _per_example)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="`groups`"):
            sam_optax.esam(groups=bad)


def test_groups_keep_the_selection_on_each_device_under_auto_axes():
    """Batch sharded over 8 devices (Auto axes): with ``groups=8`` every device runs the
    probe's backward pass on its own ``K / 8`` examples, and the result is one device's."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(3)
    batch = {
        "x": rng.normal(size=(64, 256)).astype(np.float32),
        "y": rng.normal(size=64).astype(np.float32),
    }
    params = {"w": jnp.asarray(rng.normal(size=256) * 0.1, jnp.float32), "b": jnp.asarray(0.1)}
    sharded = jax.device_put(batch, NamedSharding(mesh, P("d")))
    flops = {}
    for groups in (1, 8):
        tx = sam_optax.esam(RHO, beta=1.0, gamma=0.5, groups=groups)
        step = jax.jit(lambda p, d, tx=tx: _sds_update(tx, p, d, _per_example))
        out = step(params, sharded)
        np.testing.assert_allclose(
            np.asarray(out["w"]), np.asarray(step(params, batch)["w"]), rtol=1e-5, atol=1e-6
        )
        flops[groups] = sam_optax.profile_step(step, params, sharded).flops
    # One device's program: the backward on 4 of its 8 examples, not on all 32 kept.
    assert flops[8] < 0.6 * flops[1], flops
