"""Flax integration: NNX and Linen training steps with BatchNorm and Dropout."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
import sam_optax.flax
from sam_optax import registry

STEPS = 40


def data():
    x = jax.random.normal(jax.random.key(0), (64, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(jnp.int32)
    return x, y


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.bn(self.dense(x)))))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x))
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        return nn.Dense(2)(x)


def linen_state(tx, x):
    """A TrainState of :class:`LinenNet` with its BatchNorm statistics, and its variables."""
    variables = LinenNet().init(jax.random.key(0), x, train=False)
    state = sam_optax.flax.TrainState.create(
        apply_fn=LinenNet().apply,
        params=variables["params"],
        model_state={"batch_stats": variables["batch_stats"]},
        tx=tx,
    )
    return state, variables


def nnx_loss(model, x, y):
    return xent(model(x), y)


def make_tx(name):
    base = optax.sgd(0.1, momentum=0.9)
    # ESAM's data selection needs a per-example loss of the batch; these tests train
    # through the helpers' grad_fn only, so ESAM runs with its weight perturbation alone
    # (its selection is tested in test_esam.py). SSAM-F's Fisher mask needs the same
    # per-example loss: it keeps a fixed mask here (its Fisher is tested in test_ssam.py).
    overrides = {"esam": {"gamma": 1.0}, "ssam_f": {"update_every": None}}.get(name, {})
    return registry.make_optimizer(
        name, base, learning_rate=0.1, total_steps=STEPS, num_data=64, **overrides
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_nnx_model_trains_with_every_method(name):
    x, y = data()
    model = NNXNet(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, make_tx(name), wrt=nnx.Param)
    step = nnx.jit(lambda m, o: sam_optax.flax.nnx_step(m, o, nnx_loss, x, y))
    first = float(step(model, optimizer))
    for _ in range(STEPS - 1):
        last = float(step(model, optimizer))
    assert last < 0.7 * first


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_linen_model_trains_with_every_method(name):
    x, y = data()
    state, _ = linen_state(make_tx(name), x)

    @jax.jit
    def step(state, key):
        return sam_optax.flax.linen_step(
            state, lambda out: xent(out, y), x, train=True, rngs={"dropout": key}
        )

    losses = []
    for i in range(STEPS):
        state, loss = step(state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def probe_checker():
    """A transformation whose output is ``grad_fn(w) - g``: zero iff both passes agree."""

    def update(updates, state, params=None, *, grad_fn, **extra):
        del extra
        return jax.tree.map(lambda a, b: a - b, grad_fn(params), updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_nnx_probe_uses_same_dropout_key_and_discards_its_batch_stats():
    x, y = data()
    model = NNXNet(nnx.Rngs(0, dropout=1))
    # The probe's output is applied as the update with learning rate 1 (identity).
    optimizer = nnx.Optimizer(model, optax.chain(probe_checker()), wrt=nnx.Param)
    before = nnx.state(model, nnx.Param)
    # The clean forward pass alone, on a copy, gives the reference statistics.
    reference = nnx.clone(model)
    reference(x)
    nnx.jit(lambda m, o: sam_optax.flax.nnx_step(m, o, nnx_loss, x, y))(model, optimizer)
    # grad_fn(w) == g exactly: the same dropout mask in both passes, params unchanged.
    chex.assert_trees_all_close(nnx.state(model, nnx.Param), before, atol=1e-6)
    chex.assert_trees_all_close(model.bn.mean[...], reference.bn.mean[...], rtol=1e-6)
    chex.assert_trees_all_close(model.bn.var[...], reference.bn.var[...], rtol=1e-6)


@pytest.mark.parametrize("method", [sam_optax.sam, sam_optax.asam, sam_optax.fisher_sam])
def test_batch_stats_after_sam_step_equal_clean_pass(method):
    x, y = data()
    # NNX: one SAM step vs the clean forward pass alone.
    model = NNXNet(nnx.Rngs(0, dropout=1))
    reference = nnx.clone(model)
    reference(x)
    optimizer = nnx.Optimizer(model, optax.chain(method(), optax.sgd(0.1)), wrt=nnx.Param)
    nnx.jit(lambda m, o: sam_optax.flax.nnx_step(m, o, nnx_loss, x, y))(model, optimizer)
    np.testing.assert_allclose(model.bn.mean[...], reference.bn.mean[...], rtol=1e-6)
    np.testing.assert_allclose(model.bn.var[...], reference.bn.var[...], rtol=1e-6)
    # The probe did run at different weights: its statistics would differ.
    assert int(optimizer.opt_state[0].probes[...]) == 1

    # Linen: the same.
    state, variables = linen_state(optax.chain(method(), optax.sgd(0.1)), x)
    key = jax.random.key(3)
    _, clean = LinenNet().apply(
        variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    state, _ = jax.jit(
        lambda s: sam_optax.flax.linen_step(
            s, lambda out: xent(out, y), x, train=True, rngs={"dropout": key}
        )
    )(state)
    chex.assert_trees_all_close(state.model_state["batch_stats"], clean["batch_stats"], rtol=1e-6)


def test_linen_probe_uses_same_dropout_key():
    x, y = data()
    state, _ = linen_state(optax.chain(probe_checker()), x)
    new_state, _ = sam_optax.flax.linen_step(
        state, lambda out: xent(out, y), x, train=True, rngs={"dropout": jax.random.key(5)}
    )
    chex.assert_trees_all_close(new_state.params, state.params, atol=1e-6)


def test_linen_model_without_mutable_collections_and_with_aux():
    x, y = data()

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    variables = Plain().init(jax.random.key(0), x)
    state = sam_optax.flax.TrainState.create(
        apply_fn=Plain().apply,
        params=variables["params"],
        tx=optax.chain(sam_optax.sam(), optax.sgd(0.1)),
    )
    state, (loss, acc) = sam_optax.flax.linen_step(
        state, lambda out: (xent(out, y), jnp.mean(out.argmax(-1) == y)), x, has_aux=True
    )
    assert state.model_state == {}
    assert 0.0 <= float(acc) <= 1.0 and np.isfinite(float(loss))


def test_linen_step_without_the_clean_gradient_runs_the_clean_pass_forward_only():
    """bSAM ignores its incoming updates: the step is the same, with one backward pass fewer."""
    x, y = data()

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    variables = Plain().init(jax.random.key(0), x)
    state = sam_optax.flax.TrainState.create(
        apply_fn=Plain().apply, params=variables["params"], tx=sam_optax.bsam(0.1, 64)
    )

    def step(clean_gradient):
        return lambda s: sam_optax.flax.linen_step(
            s, lambda out: xent(out, y), x, clean_gradient=clean_gradient
        )

    def dots(f):
        return str(jax.make_jaxpr(f)(state)).count("dot_general")

    with_clean, loss = jax.jit(step(True))(state)
    without, loss_fwd = jax.jit(step(False))(state)
    chex.assert_trees_all_close(without.params, with_clean.params, rtol=1e-6)
    assert float(loss_fwd) == pytest.approx(float(loss))
    # The clean backward pass: one dot for the kernel's gradient (x has no gradient).
    assert dots(step(False)) == dots(step(True)) - 1


def test_loss_fn_with_bad_aux_is_explained():
    x, y = data()
    model = NNXNet(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.chain(sam_optax.sam(), optax.sgd(0.1)), wrt=nnx.Param)
    with pytest.raises(ValueError, match="has_aux"):
        sam_optax.flax.nnx_step(model, optimizer, nnx_loss, x, y, has_aux=True)
