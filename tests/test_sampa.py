"""SAMPa against the documented equations (docs/methods/parallel.md), in NumPy float64."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import registry


def half_square(x, batch):
    """f = ½ x² (times the batch mean, 1 here)."""
    return 0.5 * jnp.mean(batch) * jnp.sum(x**2)


@pytest.mark.parametrize("same_batch", [False, True])
def test_spec_numbers_on_half_square(same_batch):
    """f = ½x², SGD lr 0.1, rho 0.1, lam 0.2, x0 = 1: x1 = 0.9, G = 1; x2 = 0.804, G = 0.8."""
    tx = sam_optax.sampa(optax.sgd(0.1), rho=0.1, lam=0.2, same_batch=same_batch)
    x, batch = jnp.array([1.0]), jnp.ones(3)
    state = tx.init(x)
    want = [(0.9, 1.0), (0.804, 0.8)]
    for x_want, g_want in want:
        if same_batch:
            extra = {"grad_fn": lambda p: jax.grad(half_square)(p, batch)}
        else:
            extra = {"pair_grad_fn": sam_optax.pair_grad_fn(half_square, batch, batch)}
        updates, state = tx.update(None, state, x, **extra)
        x = optax.apply_updates(x, updates)
        np.testing.assert_allclose(x, [x_want], rtol=1e-6)
        np.testing.assert_allclose(state.g, [g_want], rtol=1e-6)
    assert int(state.count) == 2


# A least-squares loss whose batches differ: f(x; B) = ½ mean((A_B x - b_B)²).
RNG = np.random.default_rng(0)
BATCHES = [(RNG.normal(size=(6, 3)), RNG.normal(size=6)) for _ in range(5)]
X0 = np.array([0.5, -1.0, 2.0])


def ls_loss(x, batch):
    a, b = batch
    return 0.5 * jnp.mean((a @ x - b) ** 2)


def np_grad(x, batch):
    a, b = batch
    return a.T @ (a @ x - b) / len(b)


def np_sampa(rho, lam, lr, momentum, same_batch, steps=5, eps=1e-12):
    """The documented step in float64: y from a trial momentum step on G, x̃ on B_{t-1}."""
    x, big_g, buf = X0.copy(), np.zeros(3), np.zeros(3)
    for t in range(steps):
        batch = BATCHES[t]
        prev = batch if (same_batch or t == 0) else BATCHES[t - 1]
        x_tilde = x + rho * big_g / (np.linalg.norm(big_g) + eps)
        y = x if t == 0 else x - lr * (big_g + momentum * buf)  # the base's own trial step
        g_tilde, g_y = np_grad(x_tilde, prev), np_grad(y, batch)
        out = (1 - lam) * g_tilde + lam * g_y
        buf = out + momentum * buf
        x, big_g = x - lr * buf, g_y
    return x, big_g


def run_sampa(tx, steps=5, same_batch=False):
    x = jnp.asarray(X0, jnp.float32)
    state = tx.init(x)
    batches = [tuple(jnp.asarray(v, jnp.float32) for v in b) for b in BATCHES]

    @jax.jit
    def step(x, state, batch, prev):
        if same_batch:
            extra = {"grad_fn": lambda p: jax.grad(ls_loss)(p, batch)}
        else:
            extra = {"pair_grad_fn": sam_optax.pair_grad_fn(ls_loss, prev, batch)}
        updates, state = tx.update(None, state, x, **extra)
        return optax.apply_updates(x, updates), state

    for t in range(steps):
        x, state = step(x, state, batches[t], batches[max(t - 1, 0)])
    return x, state


@pytest.mark.parametrize("same_batch", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_several_steps_match_numpy(same_batch, momentum):
    tx = sam_optax.sampa(
        optax.sgd(0.05, momentum=momentum or None), rho=0.1, lam=0.2, same_batch=same_batch
    )
    x, state = run_sampa(tx, same_batch=same_batch)
    x_want, g_want = np_sampa(0.1, 0.2, 0.05, momentum, same_batch)
    np.testing.assert_allclose(x, x_want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(state.g, g_want, rtol=2e-5, atol=1e-6)
    assert int(state.count) == 5


def test_lagged_and_same_batch_differ():
    """The batch of x̃ matters: the lagged form is not the same-batch one."""
    lagged, _ = run_sampa(sam_optax.sampa(optax.sgd(0.05), same_batch=False))
    same, _ = run_sampa(sam_optax.sampa(optax.sgd(0.05), same_batch=True), same_batch=True)
    assert not np.allclose(lagged, same)


def test_same_batch_rho_and_lam_zero_is_the_base_optimizer_exactly():
    base = lambda: optax.sgd(0.05, momentum=0.9)  # noqa: E731
    ours, _ = run_sampa(sam_optax.sampa(base(), rho=0.0, lam=0.0, same_batch=True), same_batch=True)
    x, tx = jnp.asarray(X0, jnp.float32), base()
    state = tx.init(x)

    @jax.jit
    def step(x, state, batch):
        updates, state = tx.update(jax.grad(ls_loss)(x, batch), state, x)
        return optax.apply_updates(x, updates), state

    for t in range(5):
        x, state = step(x, state, tuple(jnp.asarray(v, jnp.float32) for v in BATCHES[t]))
    chex.assert_trees_all_equal(ours, x)


def test_lagged_rho_and_lam_zero_is_the_base_optimizer_on_the_previous_batch():
    """The documented exception to "rho = 0 is the base optimizer": the lagged batch."""
    x, _ = run_sampa(sam_optax.sampa(optax.sgd(0.05), rho=0.0, lam=0.0))
    want = X0.copy()
    for t in range(5):
        want = want - 0.05 * np_grad(want, BATCHES[max(t - 1, 0)])
    np.testing.assert_allclose(x, want, rtol=2e-5, atol=1e-6)


def test_weight_decay_enters_the_trial_step_but_not_at_step_zero():
    """y = x + base(G): AdamW's decay moves y from step 1 on; at step 0, y = x."""
    seen = []

    def pair(a, b):
        seen.append(b)
        return jax.grad(half_square)(a, jnp.ones(1)), jax.grad(half_square)(b, jnp.ones(1))

    tx = sam_optax.sampa(optax.sgd(0.1, momentum=None), rho=0.0, lam=0.5)
    decayed = sam_optax.sampa(
        optax.chain(optax.add_decayed_weights(0.5), optax.sgd(0.1)), rho=0.0, lam=0.5
    )
    x = jnp.array([1.0])
    for t in (tx, decayed):
        state = t.init(x)
        _, state = t.update(None, state, x, pair_grad_fn=pair)
        t.update(None, state, x, pair_grad_fn=pair)
    np.testing.assert_allclose([seen[0], seen[2]], [[1.0], [1.0]])  # step 0: y = x
    # step 1, G = 1 (y = x at step 0): y = 1 - 0.1 · 1, and with decay 1 - 0.1 · (1 + 0.5)
    np.testing.assert_allclose([seen[1], seen[3]], [[0.9], [0.85]], rtol=1e-6)


def test_registry_lagged_form_keeps_the_previous_batch():
    """The registry's build: the pair oracle from per_example_loss_fn and the kept batch."""
    batches = [tuple(jnp.asarray(v, jnp.float32) for v in b) for b in BATCHES]
    per_example = lambda x, b: 0.5 * (b[0] @ x - b[1]) ** 2  # noqa: E731
    tx = registry.make_optimizer(
        "sampa", optax.sgd(0.05), batch_like=jax.eval_shape(lambda: batches[0])
    )
    x = jnp.asarray(X0, jnp.float32)
    state = tx.init(x)
    for t in range(5):
        updates, state = tx.update(
            None, state, x, per_example_loss_fn=per_example, batch=batches[t]
        )
        x = optax.apply_updates(x, updates)
    want, _ = np_sampa(0.1, 0.2, 0.05, 0.0, same_batch=False)
    np.testing.assert_allclose(x, want, rtol=2e-5, atol=1e-6)
    # Without the batch's shapes the registry builds the same-batch form.
    plain = registry.make_optimizer("sampa", optax.sgd(0.05))
    assert isinstance(plain.init(x), sam_optax.SAMPaState)


def test_lagged_form_without_a_pair_oracle_is_explained():
    tx = sam_optax.sampa(optax.sgd(0.1))
    x = jnp.ones(2)
    with pytest.raises(ValueError, match=r"(?s)pair_grad_fn.*prev_batch, batch"):
        tx.update(x, tx.init(x), x, grad_fn=jax.grad(jnp.sum))
    with pytest.raises(ValueError, match="must return a pair"):
        tx.update(x, tx.init(x), x, pair_grad_fn=lambda a, b: a)
    with pytest.raises(ValueError, match="per_example_loss_fn"):
        lagged = registry.make_optimizer("sampa", optax.sgd(0.1), batch_like=jnp.ones(3))
        lagged.update(x, lagged.init(x), x, grad_fn=jax.grad(jnp.sum))


@pytest.mark.parametrize(
    ("kwargs", "arg", "fragment"),
    [
        ({"base_optimizer": "sgd"}, "base_optimizer", "'sgd'"),
        ({"rho": -0.1}, "rho", "-0.1"),
        ({"lam": 1.5}, "lam", "1.5"),
        ({"lam": "x"}, "lam", "'x'"),
        ({"eps": -1.0}, "eps", "-1.0"),
        ({"same_batch": 1}, "same_batch", "1"),
        ({"same_batch": jnp.asarray(True)}, "same_batch", "static_args"),
        ({"mask": "x"}, "mask", "'x'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg, fragment):
    kwargs = {"base_optimizer": optax.sgd(0.1), **kwargs}
    with pytest.raises(ValueError, match=f"`{arg}`.*{fragment}"):
        sam_optax.sampa(**kwargs)
