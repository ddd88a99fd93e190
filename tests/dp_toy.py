"""A toy regression shared by the data-parallel, m-sharpness, accumulation and multi-host tests.

The model is linear, ``pred = x @ kernel + bias`` with 8 inputs and 8 outputs, so that
every leaf can be sharded over 8 (or 4) devices, and its gradient has a closed form that
the tests evaluate independently in NumPy float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

FEATURES = 8
LR = 0.1


def make_params(seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "kernel": 0.5 * jax.random.normal(k1, (FEATURES, FEATURES), jnp.float32),
        "bias": 0.1 * jax.random.normal(k2, (FEATURES,), jnp.float32),
    }


def make_batch(n: int, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (n, FEATURES), jnp.float32)
    y = jnp.sin(x @ jnp.ones((FEATURES, FEATURES)) / 3.0) + 0.1 * jax.random.normal(
        k2, (n, FEATURES), jnp.float32
    )
    return x, y


def loss_fn(params: dict, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = batch
    return jnp.mean(jnp.square(x @ params["kernel"] + params["bias"] - y))


def base() -> optax.GradientTransformation:
    return optax.sgd(LR, momentum=0.9)


def sam_step(tx: optax.GradientTransformation):
    """The single-device reference step: the global batch, one device."""

    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        grad_fn = lambda p: jax.grad(loss_fn)(p, batch)  # noqa: E731
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return step


def run(step, params, state, batches):
    for batch in batches:
        params, state = step(params, state, batch)
        jax.block_until_ready(params)
    return params, state


# ----- NumPy float64 references: docs/methods/core.md (SAM), docs/multi_device.md (m-sharpness)


def np_grad(params: dict, batch) -> dict:
    x, y = (np.asarray(a, np.float64) for a in batch)
    r = x @ params["kernel"] + params["bias"] - y
    scale = 2.0 / r.size
    return {"kernel": scale * x.T @ r, "bias": scale * r.sum(axis=0)}


def np_sam_out(params: dict, batch, rho: float, eps: float = 1e-12) -> dict:
    g = np_grad(params, batch)
    norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
    w_p = {k: params[k] + rho * g[k] / (norm + eps) for k in params}
    return np_grad(w_p, batch)


def np_m_sharpness_out(params: dict, batch, rho: float, m: int) -> dict:
    x, y = (np.asarray(a, np.float64) for a in batch)
    outs = [np_sam_out(params, (x[i : i + m], y[i : i + m]), rho) for i in range(0, len(x), m)]
    return {k: np.mean([o[k] for o in outs], axis=0) for k in params}


def np_train(params, batches, out_fn, lr: float = LR) -> dict:
    """Plain SGD (no momentum) along ``out_fn(params, batch)``, in float64."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for batch in batches:
        out = out_fn(w, batch)
        w = {k: w[k] - lr * out[k] for k in w}
    return w
